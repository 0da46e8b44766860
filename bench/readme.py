"""The README's results blocks, generated from the JSON reports the benchmarks write.

    python bench/readme.py          # rewrite every block between its markers in README.md
    python bench/readme.py --check  # exit 1 where a block and its JSON disagree (the tests run it)

Each block sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is rendered
by ``BLOCKS[NAME]`` from the JSON files it names, so that no figure in the README is typed by
hand. A block's first line dates it: the commit its JSON was measured at (the ``commit`` the
benchmark recorded, else the commit that last changed the JSON) and whether the code it measures
changed since. ``--check`` ignores that line: a new commit elsewhere must not fail it, and a
shallow clone (no history) only loses the date. Standard library only: the check runs in a
second.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
AGE_PREFIX = "_Measured at "
# Code every training-based figure depends on.
TRAINING_CODE = ("deq_lightning", "conf", "train.py", "bench/_common.py")


@dataclass(frozen=True)
class Block:
    """One generated README block: the JSON it reads, the code it measures, how it renders."""

    sources: tuple[str, ...]  # JSON paths relative to the repository root
    measures: tuple[str, ...]  # code paths whose later change makes the figures stale
    render: Callable[..., list[str]]  # one loaded JSON per source -> Markdown lines


# ---------------------------------------------------------------------------------- formatting


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def count(n: int) -> str:
    """Parameter counts as the README writes them: 72.9k, 2.52M."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def code(text: str) -> str:
    return f"`{text.strip()}`"


def extra(overrides: Sequence[str], base: Sequence[str]) -> str:
    """The overrides a run adds to its family's shared ones, as inline code (empty: none)."""
    added = [o for o in overrides if o not in base]
    return f" (`{' '.join(added)}`)" if added else ""


def load_range(values: Sequence[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


# ---------------------------------------------------------------------------------- renderers


def render_defaults(eq: list, repro: dict, trellis: dict, flow_default: dict) -> list[str]:
    """The embedded experiments, each from the committed run nearest to its defaults."""
    rows = []
    for family in ("digits", "seg"):
        r = next(r for r in eq if r["family"] == family and r["model"] == "deq")
        rows.append(
            [
                code("python train.py " + " ".join(r["overrides"])),
                f"{r['metric']} {r['value']:.3f}; {pct(r['converged_fraction'])} of test samples at"
                " their fixed point (rel. 1e-3)",
                f"{r['wall_s'] / 60:.1f} min wall, {r['cpu_s'] / 60:.1f} CPU-min,"
                f" {r['max_rss_mib']:.0f} MiB peak RSS",
                f"`reports/equilibrium/results.json` ({code(r['command'])})",
            ]
        )
    lm = repro["jr"]["lm"]["plain"]
    rows.insert(
        1,
        [
            code("python train.py experiment=lm_tiny"),
            "not measured at its defaults by a committed command; the reproduction's run without"
            f" the Jacobian term{run_command(repro, 'jr/lm/plain')}: test/ppl {lm['metric']:.2f}",
            f"{lm['wall_s']:.0f} s wall",
            f"`reports/reproduction/results.json` ({code(repro_command(repro, 'jr'))})",
        ],
    )
    fd = flow_default
    rows.append(
        [
            code("python train.py experiment=flow_tiny"),
            f"test/epe {fd['test/epe']:.2f} px, {fd['test/epe'] / fd['test/epe_zero']:.3f}x the"
            f" zero flow's {fd['test/epe_zero']:.2f} (val {fd['val/epe'] / fd['val/epe_zero']:.3f}x);"
            f" {pct(fd['test/fwd_converged'])} of test samples at their fixed point (rel. 1e-3)",
            f"{fd['wall_s'] / 60:.1f} min wall, {fd['cpu_s'] / 60:.1f} CPU-min,"
            f" {fd['threads']} threads, load {fd['load_average_start'][0]:.1f}",
            f"`reports/flow/default.json` ({code('OMP_NUM_THREADS=2 ' + fd['command'])})",
        ]
    )
    source = f"`reports/trellisnet/results.json` ({code(trellis_command(trellis, 'train'))})"
    lm_t = trellis["train"]["lm_trellis_tiny"]
    copy = trellis["train"]["copy_memory_tiny"]
    rows += [
        [
            code(lm_t["command"]) + " (DEQ-TrellisNet)",
            f"test/ppl {lm_t['test/ppl']:.2f}, {lm_t['ratio_to_floor']:.2f}x the corpus's known"
            f" floor ({lm_t['test/ppl_floor']:.3f}); {pct(lm_t['test/fwd_converged'])} of test"
            " samples at their fixed point",
            f"{lm_t['cpu_s'] / 60:.1f} CPU-min, {lm_t['wall_s'] / 60:.1f} min wall at load"
            f" {lm_t['load_avg_1min_end']:.1f}",
            source,
        ],
        [
            code(copy["command"]) + " (DEQ-Transformer)",
            f"test/recall_acc {copy['test/recall_acc']:.3f};"
            f" {pct(copy['test/fwd_converged'])} of test samples at their fixed point",
            f"{copy['cpu_s'] / 60:.1f} CPU-min, {copy['wall_s'] / 60:.1f} min wall at load"
            f" {copy['load_avg_1min_end']:.1f}",
            source,
        ],
    ]
    return table(["command", "result", "time", "source"], rows)


def render_flow_peer(flow: dict) -> list[str]:
    base = flow["rows"][0]["overrides"]
    scales = sorted(
        {e["scale"]: e["size"] for r in flow["rows"] for e in r.get("real") or []}.items()
    )
    real_headers = [f"Motorcycle x{s} ({h}x{w}): EPE / zero" for s, (h, w) in scales]
    rows = [
        [
            f"`{r['name']}`{extra(r['overrides'], base)}",
            f"{r['test/epe_vs_zero']:.3f}",
            f"{r['val/epe_vs_zero']:.3f}",
            *(real_flow_cell(r, s) for s, _ in scales),
            f"{r['params']:,}",
            f"{r['cpu_s']:.0f}",
            f"{r['step_peak_mib']:.1f}",
            pct(r["converged_fraction"]),
        ]
        for r in flow["rows"]
    ]
    # Each DEQ row against the (first) peer: RAFT's rows have no converged fraction.
    peer = next(r for r in flow["rows"] if r["converged_fraction"] is None)
    deqs = [r for r in flow["rows"] if r["converged_fraction"] is not None]
    ratio = lambda row, key: row[key] / peer[key]  # noqa: E731
    real = (
        "Motorcycle: real photographs with known motion, the Middlebury 2014 stereo pair that"
        " ships with scikit-image (`deq_lightning/datamodules/flow_real.py`; flow = (-disparity, 0)"
        " from the left to the right view), downscaled by the factor shown: EPE and the zero"
        " flow's, in pixels, over the pixels of known disparity, their ratio, and whether the"
        " DEQ's solve converged there."
        if scales
        else "Real photographs (the Motorcycle pair, `deq_lightning/datamodules/flow_real.py`):"
        " not measured, this JSON predates that evaluation; rerun the command above."
    )
    return [
        f"{code(flow['command'])} (shared overrides `{' '.join(base)}`; {flow['threads']} thread,"
        f" load average {load_range(flow['load_average_start'] + flow['load_average_end'])};"
        f" same training pairs: {'yes' if flow['same_training_pairs'] else 'no'}):",
        "",
        *table(
            [
                f"{flow['train_steps']} steps",
                "test EPE / zero flow",
                "val EPE / zero flow",
                *real_headers,
                "params",
                "CPU s",
                "step peak MiB",
                "converged",
            ],
            rows,
        ),
        "",
        *(
            f"- `{d['name']}` / `{peer['name']}`: test EPE {ratio(d, 'test/epe_vs_zero'):.2f}x,"
            f" val EPE {ratio(d, 'val/epe_vs_zero'):.2f}x, CPU time {ratio(d, 'cpu_s'):.2f}x,"
            f" training-step memory {ratio(d, 'step_peak_mib'):.2f}x."
            for d in deqs
        ),
        "",
        real,
    ]


def real_flow_cell(row: dict, scale: float) -> str:
    """A row's score on the Motorcycle pair at ``scale`` ("not measured": an older row)."""
    entry = next((e for e in row.get("real") or [] if e["scale"] == scale), None)
    if entry is None:
        return "not measured"
    conv = entry["real_converged"]
    return (
        f"{entry['real_epe']:.2f} / {entry['real_epe_zero']:.2f} px ="
        f" {entry['real_epe_vs_zero']:.3f}x{'' if conv is None else f', {pct(conv)} converged'}"
    )


def render_flow_budgets(fd: dict) -> list[str]:
    """The default run's tested checkpoint re-scored at other solver budgets (eval_budgets)."""
    rows = [
        [
            b["max_iter"],
            f"{b['test/epe']:.2f}",
            f"{b['test/epe_vs_zero']:.3f}",
            f"{b['test/fwd_res_p50']:.4f}",
            pct(b["test/fwd_converged"]),
        ]
        for b in fd["eval_budgets"]
    ]
    return [
        f"The tested checkpoint of {code('python train.py experiment=flow_tiny')} re-scored on its"
        f" test pairs at other solver budgets ({code('OMP_NUM_THREADS=2 ' + fd['command'])},"
        " `reports/flow/default.json`, `eval_budgets`):",
        "",
        *table(
            ["solver iterations", "test EPE", "/ zero", "median rel. residual", "converged"], rows
        ),
    ]


def render_flow_seeds(*runs: dict) -> list[str]:
    """The default run at other seeds (bench/flow.py --default --seed N): how much the
    at-or-below-0.5x result owes to seed 0."""
    rows = [
        [
            r.get("seed", 0),
            f"{r['test/epe'] / r['test/epe_zero']:.3f}",
            f"{r['val/epe'] / r['val/epe_zero']:.3f}",
            pct(r["test/fwd_converged"]),
            f"{r['wall_s'] / 60:.1f} min, {r['threads']} thread(s),"
            f" load {r['load_average_start'][0]:.1f}",
            code(f"OMP_NUM_THREADS={r['threads']} {r['command']}"),
        ]
        for r in runs
    ]
    headers = ["seed", "test EPE / zero", "val EPE / zero", "converged", "wall", "command"]
    return [
        f"{code('python train.py experiment=flow_tiny')} at other seeds (model initialisation and"
        " training pairs; the evaluation pairs stay the same):",
        "",
        *table(headers, rows),
    ]


def render_flow_peer_seeds(*runs: dict) -> list[str]:
    """``bench/flow.py --peer`` (or ``--ablate``) at several seeds: DEQ-Flow against each peer
    (or variant) per seed and on average, since a single seed's 400-step ranking can be the
    seed's; how many seeds each side is at or below the last column's (the peer), and the
    seeds' means of what else the runs measured (real photographs, convergence, costs)."""
    names = [r["name"] for r in runs[0]["rows"]]
    per_seed, scores = [], {n: [] for n in names}
    for run in runs:
        rows = {r["name"]: r for r in run["rows"]}
        seed = next(o for o in rows[names[0]]["overrides"] if o.startswith("seed="))
        cells = []
        for n in names:
            t, v = rows[n]["test/epe_vs_zero"], rows[n]["val/epe_vs_zero"]
            scores[n].append((t, v))
            cells.append(f"{t:.3f} / {v:.3f}")
        per_seed.append([seed.removeprefix("seed="), *cells, code(run["command"])])
    per_seed.append(
        [
            "mean",
            *(
                f"{fmean([t for t, _ in scores[n]]):.3f} / {fmean([v for _, v in scores[n]]):.3f}"
                for n in names
            ),
            "",
        ]
    )
    last = scores[names[-1]]
    per_seed.append(
        [
            f"seeds at or below `{names[-1]}`",
            *(
                f"{sum(t <= lt for (t, _), (lt, _) in zip(scores[n], last))} / "
                f"{sum(v <= lv for (_, v), (_, lv) in zip(scores[n], last))} of {len(runs)}"
                for n in names[:-1]
            ),
            "",
            "",
        ]
    )
    return [
        f"`bench/flow.py --{'peer' if runs[0].get('kind', 'peer') == 'peer' else 'ablate'}` at"
        f" {len(runs)} seeds ({runs[0]['train_steps']} steps each; the"
        " seed sets model initialisation and training pairs, the evaluation pairs stay the same):",
        "",
        *table(["seed", *(f"`{n}` test / val EPE / zero" for n in names), "command"], per_seed),
        *seed_means(runs, names),
    ]


def seed_means(runs: Sequence[dict], names: Sequence[str]) -> list[str]:
    """Per side, the mean over the seeds of the real-photograph EPE over the zero flow's (each
    scale), the converged fraction of test solves (range), CPU seconds and training-step peak
    memory: only the columns every run measured."""
    by_name = {n: [next(r for r in run["rows"] if r["name"] == n) for run in runs] for n in names}
    rows = [r for side in by_name.values() for r in side]
    headers, columns = ["side"], []
    scales = [x["scale"] for x in rows[0].get("real", [])]
    if scales and all([x["scale"] for x in r.get("real", [])] == scales for r in rows):
        for i, scale in enumerate(scales):
            headers.append(f"Motorcycle x{scale:g}: EPE / zero")
            columns.append(
                lambda rs, i=i: f"{fmean([r['real'][i]['real_epe_vs_zero'] for r in rs]):.3f}"
            )
    if all("converged_fraction" in r for r in rows):
        headers.append("converged (test, range)")

        def converged(rs: list[dict]) -> str:
            xs = [r["converged_fraction"] for r in rs]
            if None in xs:
                return "n/a"
            return pct(xs[0]) if min(xs) == max(xs) else f"{min(xs):.0%}-{max(xs):.0%}"

        columns.append(converged)
    for key, label, fmt in (("cpu_s", "CPU s", ".0f"), ("step_peak_mib", "step peak MiB", ".1f")):
        if all(key in r for r in rows):
            headers.append(label)
            columns.append(lambda rs, k=key, f=fmt: format(fmean([r[k] for r in rs]), f))
    if not columns:
        return []
    return [
        "",
        f"Means over the {len(runs)} seeds:",
        "",
        *table(headers, [[f"`{n}`", *(c(by_name[n]) for c in columns)] for n in names]),
    ]


def render_flow_ablation(abl: dict) -> list[str]:
    base = abl["rows"][0]["overrides"]
    commands = list(dict.fromkeys(r["command"] for r in abl["rows"]))
    rows = [
        [
            f"`{r['name']}`{extra(r['overrides'], base)}",
            f"{r['test/epe_vs_zero']:.3f}",
            f"{r['val/epe_vs_zero']:.3f}",
            pct(r["converged_fraction"]),
            f"{r['residual_p50']:.4f}",
            f"{r['cpu_s']:.0f}",
            {True: "yes", False: "no", None: "n/a"}[r.get("same_pairs_as_deq_flow")],
            commands.index(r["command"]) + 1,
        ]
        for r in abl["rows"]
    ]
    return [
        *(f"{i}. {code(c)}" for i, c in enumerate(commands, 1)),
        "",
        f"Shared overrides `{' '.join(base)}`; {abl['threads']} thread, load average"
        f" {load_range(abl['load_average_start'] + abl['load_average_end'])} (last command).",
        "",
        *table(
            [
                f"DEQ-Flow-tiny, {abl['train_steps']} steps",
                "test EPE / zero",
                "val EPE / zero",
                "converged",
                "median rel. residual",
                "CPU s",
                "same pairs as `deq_flow`",
                "command",
            ],
            rows,
        ),
    ]


def render_equilibrium(eq: list) -> list[str]:
    commands = list(dict.fromkeys(r["command"] for r in eq))
    rows = []
    for family in dict.fromkeys(r["family"] for r in eq):
        runs = [r for r in eq if r["family"] == family]
        twin = next(r for r in runs if r["model"] == "layered")
        base = next(r for r in runs if r["model"] == "deq")["overrides"]
        for i, r in enumerate(runs):
            conv = r["converged_fraction"]
            rows.append(
                [
                    f"{family} (`{' '.join(base)}`)" if i == 0 else "",
                    f"{r['model']}{extra(r['overrides'], base)}",
                    f"{r['metric']} {r['value']:{'.3f' if r['value'] < 10 else '.1f'}}",
                    "" if r is twin else f"{r['value'] / twin['value']:.3f}x",
                    count(r["params"]),
                    "" if conv is None else f"{conv:.3f} / {r['train_converged_fraction']:.3f}",
                    "" if r["solver_steps"] is None else f"{r['solver_steps']:.1f}",
                    f"{r['cpu_s'] / 60:.1f}",
                    commands.index(r["command"]) + 1,
                ]
            )
    return [
        *(f"{i}. {code(c)}" for i, c in enumerate(commands, 1)),
        "",
        *table(
            [
                "family (shared overrides)",
                "model",
                "test metric",
                "vs twin",
                "params",
                "converged (test / last train epoch)",
                "test solver steps",
                "CPU-min",
                "command",
            ],
            rows,
        ),
    ]


def render_solvers(solvers: dict) -> list[str]:
    forward = [
        [
            r["problem"],
            r["solver"],
            r["nfe"],
            "yes" if r["converged"] else "no",
            f"{1e3 * r['seconds']:.1f}",
            f"{r['overhead']:.0%}",
            "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}",
        ]
        for r in solvers["forward"]
    ]
    verdicts = [[t["target"], t["measured"], t["verdict"]] for t in solvers["targets"]]
    load = solvers["load_average_1_5_15"]
    return [
        f"{code(solvers['command'])} (torch {solvers['torch']}, torchdeq"
        f" {solvers['torchdeq'] or 'not installed'}, {solvers['threads']} thread"
        + (f", load average {load_range(load)}" if load else "")
        + "):",
        "",
        *table(["problem", "solver", "NFE", "converged", "ms", "overhead", "peak MiB"], forward),
        "",
        *table(["target", "measured", "verdict"], verdicts),
    ]


def render_compaction(c: dict) -> list[str]:
    rows = [
        [
            r["solver"],
            f"{r['easy_nstep_mean']:.1f} / {r['hard_nstep_mean']:.1f}",
            f"{1e3 * r['seconds_off']:.0f} ms",
            f"{1e3 * r['seconds_on']:.0f} ms",
            f"{r['speedup_off_over_on']:.2f}x (target {c['target_speedup']:g}x:"
            f" {'met' if r['speedup_off_over_on'] >= c['target_speedup'] else 'not met'})",
        ]
        for r in c["rows"]
    ]
    return [
        f"{code(c['command'])}: {c['problem']}, {c['stop_mode']} {c['tol']:g}, on/off"
        f" interleaved, {c['repeats']} repeats, {c['threads']} thread, load average"
        f" {load_range(c['load_average_1_5_15'])}:",
        "",
        *table(
            ["solver", "steps easy / hard", "off", "on (`solver.compact=on`)", "speed-up"], rows
        ),
    ]


def render_thesis_scale(rows: list, meta: dict) -> list[str]:
    def fmt(v: float | None, spec: str) -> str:  # the peak is None where RSS cannot be reset
        return "n/a" if v is None else format(v, spec)

    def verdict(r: dict) -> str:
        if r["target_ratio"] is None:
            return ""
        met = "met" if r["target_met"] else "not met"
        return f" (target {r['target_ratio']:g}x on {r.get('ratio_on', 'activation')}: {met})"

    body = [
        [
            f"{r['system']}, batch {r['batch']}",
            f"{fmt(r['deq_peak_mib'], '.0f')} / {fmt(r['explicit_peak_mib'], '.0f')}",
            f"{r['deq_activation_mib']:.0f} / {r['explicit_activation_mib']:.0f}",
            f"{fmt(r['peak_ratio'], '.2f')}x / {r['activation_ratio']:.2f}x{verdict(r)}",
            r["thesis_note"]
            + (
                ""
                if r["thesis_ratio"] is None or ratio_in(r["thesis_note"])
                else f" ({r['thesis_ratio']:.2f}x)"
            ),
        ]
        for r in rows
    ]
    return [
        f"{code(meta['command'])} ({meta['when']}; {meta['threads']} thread, load average"
        f" {load_range([meta['load_before'], meta['load_after']])}; LM and MDEQ solver budgets"
        f" capped at {meta['max_iter']} steps):",
        "",
        *table(
            [
                "pair",
                "peak MiB DEQ / explicit",
                "activations MiB DEQ / explicit",
                "explicit / DEQ: peak / activations",
                "thesis",
            ],
            body,
        ),
    ]


def ratio_in(text: str) -> bool:
    """Whether a note already states a ratio ("4-6x less ...")."""
    return re.search(r"\dx\b", text) is not None


def render_gpu(gpu: dict) -> list[str]:
    meta = gpu["meta"]
    if not meta["cuda"]:
        return [
            f"**Not yet run on a GPU**: `reports/gpu.json` holds {code(meta['command'])}'s dry"
            f" pass on {meta['device']} ({meta['when']}, {meta['steps']} steps per model on"
            " shrunk configs), which checks the command, not the figures."
        ]
    rows = [
        [
            r["system"],
            f"{r['deq']['throughput']:.4g} / {r['explicit_run']['throughput']:.4g}"
            f" {r['deq']['unit']}",
            f"{r['deq']['peak_mib']:.0f} / {r['explicit_run']['peak_mib']:.0f}",
            f"{r['memory_ratio']:.2f}x",
        ]
        for r in gpu["rows"]
    ]
    return [
        f"{code(meta['command'])} on {meta['device']} ({meta['when']}):",
        "",
        *table(["pair", "throughput DEQ / explicit", "peak MiB DEQ / explicit", "ratio"], rows),
    ]


def time_to_reach(trace: dict, target: float) -> float | None:
    """Seconds a solver's residual trace takes to reach ``target`` (None: never)."""
    steps = next((i + 1 for i, r in enumerate(trace["rel"]) if r <= target), None)
    return None if steps is None else trace["s_per_step"] * steps


def render_reproduction(repro: dict) -> list[str]:
    lines = ["Measured by:", "", *(f"- {line}" for line in repro["invocations"]), ""]
    lines.append(
        "* **Constant memory**: peak MiB of one training step, the DEQ against backprop through"
        " N applications of f:"
    )
    lines.append("")
    mem = []
    for exp, rs in repro["memory"].items():
        last = rs[-1]
        mem.append(
            [
                f"`{exp}`",
                f"{min(r[1] for r in rs):.1f}-{max(r[1] for r in rs):.1f}",
                " → ".join(f"{r[2]:.0f}" for r in rs),
                f"{last[2] / last[1]:.1f}x",
            ]
        )
    ns = ", ".join(str(r[0]) for r in next(iter(repro["memory"].values())))
    lines += table(
        ["experiment", "DEQ MiB (all N)", f"unrolled MiB (N = {ns})", "unrolled / DEQ at last N"],
        mem,
    )
    lines.append("")
    jr_rows = []
    for task, e in repro["jr"].items():
        plain, jr = e["plain"], e["jr"]
        jr_rows.append(
            [
                task,
                f"{plain['nstep']:.1f} → {jr['nstep']:.1f} ({plain['nstep'] / jr['nstep']:.2f}x)",
                f"{plain['metric']:.3f} → {jr['metric']:.3f}",
                f"{plain['metric_small_budget']:.3f} → {jr['metric_small_budget']:.3f}"
                + (f" ({plain['small_budget']} Anderson steps)" if "small_budget" in plain else ""),
            ]
        )
    lines += [
        "* **Jacobian regularization**: without → with the term.",
        "",
        *table(
            ["task", "test steps to rel. 1e-3", "test metric", "test metric at a small budget"],
            jr_rows,
        ),
        "",
        "* **Solvers** (on the unregularized models): speed-up over Anderson in wall-clock to"
        " Anderson's 12-step residual on one test batch, and the best test metric each solver"
        " reaches within the smallest test-set budget of the report's grid (+5%).",
        "",
    ]
    solver_rows = []
    for task, e in repro["solvers"].items():
        anderson = e["traces"]["anderson"]
        target = anderson["rel"][min(11, len(anderson["rel"]) - 1)]
        base = time_to_reach(anderson, target)
        k, budget, _ = e["curves"]["anderson"][1]
        better = max if task == "digits" else min
        for solver, trace in e["traces"].items():
            reach = time_to_reach(trace, target)
            within = [m for _, s, m in e["curves"][solver] if s <= budget * 1.05]
            solver_rows.append(
                [
                    task,
                    solver,
                    "never" if reach is None else f"{base / reach:.2f}x",
                    f"{budget:.2f} s (Anderson, {k} steps)",
                    f"{better(within):.3f}" if within else "n/a",
                ]
            )
    lines += table(
        ["task", "solver", "speed-up to Anderson@12's residual", "test-set budget", "best metric"],
        solver_rows,
    )
    if "inputs" in repro:
        lines += [
            "",
            "Inputs (`reused`: left by an earlier call and used with `--reuse`):",
            "",
            *table(
                ["input", "made by", "reused"],
                [
                    [
                        key,
                        code(r["command"]) if r["command"] else f"not recorded ({r['file']})",
                        "yes" if r["reused"] else "no",
                    ]
                    for key, r in repro["inputs"].items()
                ],
            ),
        ]
    return lines


def render_trellisnet(t: dict) -> list[str]:
    mem, ptb = t["memory"], t["ptb"]
    ns = [r["n"] for r in mem["rows"]]
    return [
        f"{code(trellis_command(t, 'memory'))}: peak CPU MiB of one step above the set-up:",
        "",
        *table(
            ["model", *(f"N = {n}" for n in ns)],
            [
                [f"`{mem['experiment']}` DEQ ({count(mem['params'])} params)"]
                + [f"{r['deq_mib']:.1f}" for r in mem["rows"]],
                ["its layered twin"] + [f"{r['twin_mib']:.1f}" for r in mem["rows"]],
            ],
        ),
        "",
        f"`{ptb['experiment']}` ({count(ptb['params'])} params, {ptb['length']}-token sequences,"
        f" batch {ptb['batch']}, {ptb['deq_solver_steps']} solver steps): DEQ"
        f" {ptb['deq_mib']:.0f} MiB against {ptb['twin_mib']:.0f} MiB for the"
        f" {ptb['twin_depth']}-level TrellisNet ({1 - ptb['deq_mib'] / ptb['twin_mib']:.0%} less).",
    ]


def trellis_command(t: dict, study: str) -> str:
    """The last recorded ``bench/trellisnet.py`` invocation that ran ``study`` (all studies
    when the invocation names none)."""
    for line in reversed(t["invocations"]):
        cmd = line.split("`")[1]
        if "--studies" not in cmd or study in cmd.split("--studies", 1)[1]:
            return cmd
    raise KeyError(f"reports/trellisnet/results.json: no invocation ran the {study!r} study")


def repro_command(repro: dict, study: str) -> str:
    """The last recorded ``bench/reproduce.py`` invocation that ran ``study``."""
    for line in reversed(repro["invocations"]):
        cmd = line.split("`")[1]
        if "--studies" not in cmd or study in cmd.split("--studies", 1)[1].split("--")[0]:
            return cmd
    raise KeyError(f"reports/reproduction/results.json: no invocation ran the {study!r} study")


def run_command(repro: dict, key: str) -> str:
    """`` (`train.py ...`)`` where the reproduction recorded the run's command."""
    record = repro.get("inputs", {}).get(key)
    return f" ({code(record['command'])})" if record else ""


def seed_files(path: str, seeds: int) -> tuple[str, ...]:
    """A multi-seed benchmark's files for seeds 0..seeds-1: seed N > 0 adds ``_seed<N>`` before
    the extension (bench/flow.py's naming)."""
    stem, suffix = path.rsplit(".", 1)
    return tuple(f"{stem}{'' if n == 0 else f'_seed{n}'}.{suffix}" for n in range(seeds))


BLOCKS: dict[str, Block] = {
    "defaults": Block(
        (
            "reports/equilibrium/results.json",
            "reports/reproduction/results.json",
            "reports/trellisnet/results.json",
            "reports/flow/default.json",
        ),
        TRAINING_CODE,
        render_defaults,
    ),
    "flow": Block(
        ("reports/flow/results.json",), (*TRAINING_CODE, "bench/flow.py"), render_flow_peer
    ),
    "flow-peer-seeds": Block(
        seed_files("reports/flow/results.json", 10),
        (*TRAINING_CODE, "bench/flow.py"),
        render_flow_peer_seeds,
    ),
    "flow-small-peer": Block(
        seed_files("reports/flow/small_peer/results.json", 4),
        (*TRAINING_CODE, "bench/flow.py"),
        render_flow_peer_seeds,
    ),
    "flow-update-width": Block(
        seed_files("reports/flow/update_width/ablation.json", 4),
        (*TRAINING_CODE, "bench/flow.py"),
        render_flow_peer_seeds,
    ),
    "flow-budgets": Block(
        ("reports/flow/default.json",), (*TRAINING_CODE, "bench/flow.py"), render_flow_budgets
    ),
    "flow-seeds": Block(
        (
            "reports/flow/default.json",
            "reports/flow/default_seed1.json",
            "reports/flow/default_seed2.json",
        ),
        (*TRAINING_CODE, "bench/flow.py"),
        render_flow_seeds,
    ),
    "flow-ablation": Block(
        ("reports/flow/ablation.json",), (*TRAINING_CODE, "bench/flow.py"), render_flow_ablation
    ),
    "equilibrium": Block(
        ("reports/equilibrium/results.json",),
        (*TRAINING_CODE, "bench/equilibrium.py"),
        render_equilibrium,
    ),
    "solvers": Block(
        ("reports/solvers.json",),
        ("deq_lightning/deq", "bench/solvers.py", "bench/_common.py"),
        render_solvers,
    ),
    "compaction": Block(
        ("reports/compaction.json",),
        ("deq_lightning/deq", "bench/solvers.py", "bench/_common.py"),
        render_compaction,
    ),
    "thesis-scale": Block(
        ("reports/thesis_scale.json", "reports/thesis_scale_meta.json"),
        (*TRAINING_CODE, "bench/thesis_scale.py"),
        render_thesis_scale,
    ),
    "gpu": Block(("reports/gpu.json",), (*TRAINING_CODE, "bench/gpu.py"), render_gpu),
    "reproduction": Block(
        ("reports/reproduction/results.json",),
        (*TRAINING_CODE, "bench/reproduce.py"),
        render_reproduction,
    ),
    "trellisnet": Block(
        ("reports/trellisnet/results.json",),
        (*TRAINING_CODE, "bench/trellisnet.py"),
        render_trellisnet,
    ),
}

# ---------------------------------------------------------------------------------- staleness


def git(*args: str) -> str | None:
    """A git command's output, ``None`` where git or the history is missing (a shallow clone)."""
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def recorded_commits(doc: object) -> set[str]:
    """Commits a benchmark recorded: top-level or ``meta`` ``commit``, per-study ``commits``,
    per-input ``inputs`` or per-row ``commit`` (rows kept from earlier runs keep theirs)."""
    items = doc if isinstance(doc, list) else [doc, doc.get("meta"), *doc.get("rows", [])]
    if isinstance(doc, dict):
        items += list(doc.get("inputs", {}).values())
    found = set()
    for item in items:
        if isinstance(item, dict):
            found.add(item.get("commit"))
            found.update(item.get("commits", {}).values())
    return {c for c in found if c}


def age_line(block: Block, docs: Sequence[object]) -> str:
    commits: set[str] = set()
    for source, doc in zip(block.sources, docs):
        # Measured before the benchmarks recorded their commit: the commit that last changed it.
        commits |= recorded_commits(doc) or {git("log", "-1", "--format=%H", "--", source) or ""}
    commits.discard("")
    if not commits:
        return AGE_PREFIX + "an unknown commit (no git history for its JSON here)._"
    dirty = any(c.endswith("+dirty") for c in commits)
    shas = sorted(c.removesuffix("+dirty") for c in commits)
    changed = set()
    for sha in shas:
        log = git("log", "--format=%h", f"{sha}..HEAD", "--", *block.measures)
        if log is None:
            return AGE_PREFIX + f"{', '.join(s[:7] for s in shas)} (age unknown: no history)._"
        changed.update(log.split())
    state = (
        f"the code it measures changed since ({len(changed)} commits): rerun its command"
        if changed
        else "the code it measures is unchanged since"
    )
    note = " with uncommitted changes" if dirty else ""
    return AGE_PREFIX + f"{', '.join(s[:7] for s in shas)}{note}; {state}._"


# ---------------------------------------------------------------------------------- README


def render(name: str, dated: bool) -> list[str]:
    """A block's lines; ``dated`` adds its age line (not compared by ``--check``)."""
    block = BLOCKS[name]
    paths = [ROOT / s for s in block.sources]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0].relative_to(ROOT)}: the README block {name!r} renders from it; run the"
            " benchmark that writes it (its command is in the README) or drop the block"
        )
    docs = [json.loads(p.read_text()) for p in paths]
    try:
        lines = block.render(*docs)
    except (KeyError, IndexError, TypeError, StopIteration) as err:
        raise ValueError(
            f"{', '.join(block.sources)}: the README block {name!r} cannot render ({err!r}); the"
            " JSON lacks what bench/readme.py expects: rerun its benchmark or update the renderer"
        ) from err
    return ([age_line(block, docs), ""] if dated else []) + lines


def blocks_in(text: str) -> dict[str, tuple[int, int]]:
    """Each block's (start, end) character span between its markers."""
    spans = {}
    for m in re.finditer(r"<!-- results:([\w-]+) -->\n(.*?)<!-- /results:\1 -->", text, re.S):
        spans[m.group(1)] = (m.start(2), m.end(2))
    return spans


def undated(body: str) -> list[str]:
    return [line for line in body.strip("\n").split("\n") if not line.startswith(AGE_PREFIX)]


def check(text: str) -> list[str]:
    """What disagrees between a README text and the JSON reports (empty: all agree)."""
    spans = blocks_in(text)
    problems = [
        f"README.md: the block {name!r} is missing (add `<!-- results:{name} -->` and"
        f" `<!-- /results:{name} -->`, then run `python bench/readme.py`)"
        for name in BLOCKS
        if name not in spans
    ]
    for name, (start, end) in spans.items():
        if name not in BLOCKS:
            problems.append(f"README.md: unknown block {name!r} (bench/readme.py has no renderer)")
            continue
        want, have = [line for line in render(name, False) if line], undated(text[start:end])
        have = [line for line in have if line]
        if want != have:
            diff = next((w, h) for w, h in zip([*want, ""], [*have, ""]) if w != h)
            problems.append(
                f"README.md: the block {name!r} disagrees with {', '.join(BLOCKS[name].sources)}"
                f" (JSON gives {diff[0]!r}, README has {diff[1]!r}): run `python bench/readme.py`"
            )
    return problems


def rewrite(text: str) -> str:
    spans = blocks_in(text)
    missing = [name for name in BLOCKS if name not in spans]
    if missing:
        raise KeyError(f"README.md: no markers for {missing}; add `<!-- results:NAME -->` pairs")
    for name, (start, end) in sorted(spans.items(), key=lambda kv: -kv[1][0]):
        text = text[:start] + "\n".join(render(name, True)) + "\n" + text[end:]
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on disagreement")
    args = ap.parse_args()
    text = README.read_text()
    if args.check:
        problems = check(text)
        print("\n".join(problems) or "README results agree with reports/", file=sys.stderr)
        sys.exit(1 if problems else 0)
    new = rewrite(text)
    if new != text:
        README.write_text(new)
    print(f"{len(BLOCKS)} blocks rendered into {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
