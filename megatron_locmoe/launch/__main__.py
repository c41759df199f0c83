from megatron_locmoe.launch.cli import main

raise SystemExit(main())
