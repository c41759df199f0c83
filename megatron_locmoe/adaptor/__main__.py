from megatron_locmoe.adaptor.patches import main

main()
