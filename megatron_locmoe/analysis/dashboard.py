"""A W&B workspace for comparing routers, built with wandb-workspaces.

    python -m megatron_locmoe.analysis.dashboard --entity E --project P            # saves it (network)
    python -m megatron_locmoe.analysis.dashboard --entity E --project P --dry-run  # prints the panels
    python -m megatron_locmoe.analysis.dashboard --entity E --project P --check runs/demo/wandb

Every panel plots metrics under exactly the names the runs log: Megatron's MoE tracker writes
the plugin's metrics (``metrics.PLUGIN_METRICS``) and Megatron's ``load_balancing_loss`` under
their own names, per-layer values as ``moe/<name>_layer_<i>`` (0-based, with per-layer logging
on, as the demo runs), and the trainer logs ``lm loss``. ``--check`` reads local offline run
files and refuses to save a workspace with a panel key no run logged (a typo there gives an
empty panel in W&B, silently). Each run shows under its run name (the demo's: megatron,
megatron-node-limited, locmoe-top2, hash, switch, locmoe-top1).
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

from megatron_locmoe import metrics
from megatron_locmoe.analysis.errors import InputError, run_tool

LM_LOSS = "lm loss"
"""The trainer's (and Megatron's training_log's) name for the language-model loss."""


def per_layer(name: str, num_layers: int) -> list[str]:
    """Megatron's per-layer names of ``name`` (MoEMetricsTracker._log_per_layer)."""
    return [f"moe/{name}_layer_{i}" for i in range(num_layers)]


def sections_spec(num_layers: int) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """[(section, [(panel title, [metric keys])])]: the workspace's content, plain data so it
    can be checked without building W&B objects."""
    m = metrics
    return [
        (
            "Loss",
            [
                ("lm loss", [LM_LOSS]),
                ("load-balancing loss", [m.LOAD_BALANCING_LOSS]),
                ("locality loss (LocMoE)", [m.LOCALITY_LOSS]),
            ],
        ),
        (
            "Locality and traffic",
            [
                ("node-local fraction of assignments", [m.NODE_LOCAL_FRACTION]),
                ("inter-node bytes per rank-step (the run's dispatcher)", [m.INTER_NODE_BYTES]),
                (
                    "inter-node bytes per rank-step, by scheme",
                    [m.FLAT_INTER_NODE_BYTES, m.TWO_HOP_INTER_NODE_BYTES, m.DEDUP_INTER_NODE_BYTES],
                ),
                ("intra-node bytes per rank-step", [m.INTRA_NODE_BYTES]),
            ],
        ),
        (
            "Load balance and capacity",
            [
                ("load CV (mean over layers)", [m.LOAD_CV]),
                ("tokens received per EP rank, max / mean", [m.RECEIVED_LOAD]),
                ("dropped assignments", [m.TOKENS_DROPPED]),
                ("expert capacity (0 = dropless)", [m.EXPERT_CAPACITY]),
                ("capacity bound ec_min", [m.CAPACITY_EC_MIN]),
                ("capacity delta", [m.CAPACITY_DELTA]),
                ("expert-choice phase (share of layers; locmoe_plus)", [m.EXPERT_CHOICE]),
            ],
        ),
        (
            "Per MoE layer",
            [
                ("load CV per layer", per_layer(m.LOAD_CV, num_layers)),
                ("node-local fraction per layer", per_layer(m.NODE_LOCAL_FRACTION, num_layers)),
                ("inter-node bytes per layer", per_layer(m.INTER_NODE_BYTES, num_layers)),
                ("dropped per layer", per_layer(m.TOKENS_DROPPED, num_layers)),
            ],
        ),
    ]


def panel_keys(num_layers: int) -> set[str]:
    return {k for _, panels in sections_spec(num_layers) for _, keys in panels for k in keys}


def build_workspace(
    entity: str, project: str, name: str = "LocMoE router comparison", num_layers: int = 2
):
    """The ``wandb_workspaces`` Workspace object (built offline; ``.save()`` needs a server)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    sections = [
        ws.Section(
            name=section,
            is_open=True,
            panels=[wr.LinePlot(title=title, x="Step", y=list(keys)) for title, keys in panels],
        )
        for section, panels in sections_spec(num_layers)
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis="Step", smoothing_type="none", max_runs=20),
    )


def workspace_keys(workspace) -> set[str]:
    """Every metric key a workspace's panels plot (from the built objects)."""
    return {k for section in workspace.sections for panel in section.panels for k in panel.y}


# --------------------------------------------------------------------------------------------
# Reading offline W&B run files (no network, no wandb internals)
# --------------------------------------------------------------------------------------------

_BLOCK = 32768
_HEADER = 7  # ":W&B", 2-byte magic, 1-byte version


def _records(raw: bytes) -> list[bytes]:
    """The protobuf records of a ``.wandb`` transaction log (LevelDB's log format: 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    if raw[:4] != b":W&B":
        raise ValueError("no ':W&B' header at its start")
    out, parts, pos = [], [], _HEADER
    while pos + 7 <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            parts = [data]
        elif kind == 3:
            parts.append(data)
        elif kind == 4:
            out.append(b"".join([*parts, data]))
            parts = []
    return out


def logged_keys(path: str | Path) -> set[str]:
    """History keys logged by the offline W&B runs under ``path`` (a ``.wandb`` file or any
    directory above them; W&B's own ``_step``-style keys left out)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no W&B run files (run-*.wandb) under {path}")
    from google.protobuf.message import DecodeError

    keys: set[str] = set()
    for f in files:
        try:
            records = [pb.Record.FromString(data) for data in _records(f.read_bytes())]
        except (ValueError, DecodeError) as e:  # named, for run_tool's one error line
            raise InputError(
                f"{f} is not a W&B run file ({e}): point --check at the runs' offline "
                "wandb directory"
            ) from None
        for rec in records:
            if rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    keys.add(item.key or "/".join(item.nested_key))
    return {k for k in keys if not k.startswith("_")}


def check_keys(workspace, logged: set[str]) -> None:
    """Raise ValueError naming every panel key that no run logged."""
    missing = sorted(workspace_keys(workspace) - logged)
    if missing:
        raise ValueError(
            f"panel keys not logged by any run: {missing} (logged: {sorted(logged)}); "
            "check --num-layers and that the runs log per-layer metrics"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True)
    parser.add_argument(
        "--project", required=True, help="the runs' W&B project (trainer: megatron-locmoe)"
    )
    parser.add_argument("--name", default="LocMoE router comparison")
    parser.add_argument("--num-layers", type=int, default=2, help="MoE layers of the runs")
    parser.add_argument(
        "--check", metavar="DIR", help="offline run files to check the keys against"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the panels, save nothing")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name, args.num_layers)
    if args.check:
        check_keys(workspace, logged_keys(args.check))
        print(f"every panel key is logged by the runs under {args.check}")
    if args.dry_run:
        for section in workspace.sections:
            print(section.name)
            for panel in section.panels:
                print(f"  {panel.title}: {', '.join(panel.y)}")
        return
    workspace.save()
    print(f"workspace saved: {workspace.url}")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
