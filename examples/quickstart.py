"""gradbal's main job: distil a small CNN on real data, three ways, in under 3 minutes on a CPU.

Data: scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes; nothing is
downloaded), one fixed stratified split: half for test, half for training. The teacher trains
on the whole training half; the students get a small labelled subset of it (``--n-train``),
the setting where a teacher's soft targets matter.

Students (same narrow CNN, same steps, same learning rate, several seeds):

* ``scratch``  cross-entropy only;
* ``kd``       classic KD: fixed ``0.5 CE + 0.5 KL`` (Hinton et al. 2015, T = 4);
* ``mokd``     ``gradbal.MultiObjectiveOptimizer(method="mokd")`` balancing three objectives
  ``[CE, KL, feature loss of a gradbal.SubspaceProjector]`` every step.

It prints a table (test accuracy mean, std and range over the seeds, time per step) and
saves ``quickstart.png``: accuracy curves, the conflict (cosine) and dominance (norm ratio)
between MoKD's objectives as measured by the optimizer (``opt.last_stats``), and MoKD's
trade-off weights.

Choices, and why:

* One learning rate for every student: classic KD's best on the validation images (the
  training half minus the students' subset), found by ``--magnitude-study`` (0.8; the sweep
  0.1/0.2/0.4/0.8/1.6 gave 83.3/84.4/86.0/86.6/78.2% validation accuracy).
* MoKD's Gram matrix over all trained parameters (``gram_params="all"``, the library's default,
  chosen from this measurement): the projector's parameters are reached by the feature
  objective alone; left out of the Gram matrix (``"shared"``), that objective looks slow to
  improve (its gradient on the student is small and nearly orthogonal to CE's and KL's), the
  min-norm weights give it almost everything and the student barely learns (about 52% vs 85%
  mean test accuracy in the study). With ``"all"`` the Gram matrix describes the update that
  is actually applied.
* 50 labelled images for the students (5 per class): where a teacher's soft targets matter,
  so the distilled students' lead over the spread of the seeds is large and stable.

    python examples/quickstart.py                 # the full run (README's main job)
    python examples/quickstart.py --quick         # the reduced form CI runs
    python examples/quickstart.py --magnitude-study   # MoKD's magnitude policy, measured
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradbal

TEMPERATURE = 4.0  # the CIFAR-100 protocol's T for logit KD (mdistiller); see ANCHORS.md


# ----------------------------------------------------------------------------- data
@dataclass
class Digits:
    x_train: torch.Tensor  # the teacher's training set
    y_train: torch.Tensor
    x_student: torch.Tensor  # the students' labelled subset of it
    y_student: torch.Tensor
    x_val: torch.Tensor  # the rest of the training half (for tuning, never for the table)
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(n_train: int, split_seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=split_seed
    )
    if not 10 <= n_train < len(y_tr):
        raise ValueError(f"--n-train must be in [10, {len(y_tr)}), got {n_train}")
    x_st, x_va, y_st, y_va = train_test_split(
        x_tr, y_tr, train_size=n_train, stratify=y_tr, random_state=split_seed
    )
    mean, std = x_tr.mean(), x_tr.std()

    def t(a, dtype=torch.float32):
        return torch.as_tensor(a, dtype=dtype)

    def norm(a):
        return t((a - mean) / std)

    return Digits(
        norm(x_tr), t(y_tr, torch.long), norm(x_st), t(y_st, torch.long),
        norm(x_va), t(y_va, torch.long), norm(x_te), t(y_te, torch.long),
    )  # fmt: skip


def shift_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1 pixel (zero padding): the only augmentation."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


# ----------------------------------------------------------------------------- models
class CNN(nn.Module):
    """conv-conv-pool-conv-pool-linear; ``width`` sets every layer's channels."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),  # "features.6": [B, 2w, 4, 4], the distilled stage
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


STAGE = "features.6"  # module whose output the projector aligns (both networks)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def batches(n: int, batch_size: int, generator: torch.Generator):
    """An endless stream of shuffled index batches (seeded: runs are repeatable)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def train_teacher(data: Digits, width: int, steps: int, lr: float, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CNN(width)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    stream = batches(len(data.y_train), 64, gen)
    for _ in range(steps):
        idx = next(stream)
        loss = F.cross_entropy(model(shift_augment(data.x_train[idx], gen)), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ----------------------------------------------------------------------------- students
@dataclass
class Run:
    method: str
    seed: int
    final_acc: float = 0.0  # test accuracy at the end
    val_acc: float = 0.0  # validation accuracy at the end (for tuning only)
    curve: list = field(default_factory=list)  # (step, test accuracy)
    step_time: float = 0.0  # seconds per training step (forward + backward(s) + step)
    cosines: list = field(default_factory=list)  # per step: [cos(CE,KL), cos(CE,F), cos(KL,F)]
    ratios: list = field(default_factory=list)  # per step: [|g_KL|/|g_CE|, |g_F|/|g_CE|]
    pis: list = field(default_factory=list)  # per step: MoKD's trade-off weights pi_k
    diverged: bool = False


def train_student(
    method: str,
    seed: int,
    data: Digits,
    teacher: CNN,
    *,
    width: int,
    steps: int,
    lr: float,
    batch_size: int,
    eval_every: int,
    magnitude: str = "mean_loss",
    max_norm: float | None = None,
    gram_params: str = "all",
    feature_objective: bool = True,
    progress=None,
) -> Run:
    """Train one student; ``method`` in {"scratch", "kd", "mokd"}.

    ``feature_objective=False`` runs MoKD on [CE, KL] only (no projector), for ablations.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    student = CNN(width)
    frozen = gradbal.FrozenTeacher(teacher)
    params = list(student.parameters())
    run = Run(method, seed)

    if method == "mokd" and feature_objective:
        # Teacher and student features of one stage, captured by module name (no model edits).
        feats_s = gradbal.FeatureCapture(student, [STAGE])
        feats_t = gradbal.FeatureCapture(frozen, [STAGE])
        projector = gradbal.SubspaceProjector(2 * width, teacher.fc.in_features)
        params += list(projector.parameters())  # trained with the student, dropped after
    base = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    opt = base
    if method == "mokd":
        opt = gradbal.MultiObjectiveOptimizer(
            base,
            method="mokd",
            magnitude=magnitude,
            max_norm=max_norm,
            gram_params=gram_params,
            nonfinite="skip",
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    stream = batches(len(data.y_student), batch_size, gen)
    elapsed = 0.0
    for step in range(1, steps + 1):
        idx = next(stream)
        x, y = shift_augment(data.x_student[idx], gen), data.y_student[idx]
        t0 = time.perf_counter()
        logits = student(x)
        ce = F.cross_entropy(logits, y)
        if method == "scratch":
            opt.zero_grad()
            ce.backward()
            opt.step()
        elif method == "kd":
            kd = gradbal.kd_loss(logits, frozen(x), TEMPERATURE)
            opt.zero_grad()
            (0.5 * ce + 0.5 * kd).backward()
            opt.step()
        elif method == "mokd":
            kd = gradbal.kd_loss(logits, frozen(x), TEMPERATURE)
            losses = [ce, kd]
            if feature_objective:
                losses.append(projector(feats_s.pop(), feats_t.pop()))
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
        else:
            raise ValueError(f"unknown student method {method!r}")
        sched.step()
        elapsed += time.perf_counter() - t0
        if method == "mokd":
            # Measured by the optimizer at no extra cost (tensors; .tolist() is our sync).
            s = opt.last_stats
            cos, norms = s.cosines.tolist(), s.norms.tolist()
            ref = norms[0] if norms[0] > 0 else float("nan")
            if feature_objective:
                run.cosines.append([cos[0][1], cos[0][2], cos[1][2]])
                run.ratios.append([norms[1] / ref, norms[2] / ref])
            else:
                run.cosines.append([cos[0][1]])
                run.ratios.append([norms[1] / ref])
            # MoKD's trade-off weights pi_k = w_k L_k / sum_j w_j L_j (w: raw-gradient weights)
            pi = s.weights * s.losses
            run.pis.append((pi / pi.sum()).tolist())
        if step % eval_every == 0 or step == steps:
            run.curve.append((step, accuracy(student, data.x_test, data.y_test)))
        if progress is not None:
            progress()
    if method == "mokd":
        run.diverged = opt.skipped_steps > 0 or not all(
            math.isfinite(p.detach().sum().item()) for p in student.parameters()
        )
        if feature_objective:
            feats_s.remove()
            feats_t.remove()
    run.final_acc = run.curve[-1][1]
    run.val_acc = accuracy(student, data.x_val, data.y_val)
    run.step_time = elapsed / steps
    return run


# ----------------------------------------------------------------------------- reporting
class Progress:
    """tqdm when installed, else one self-rewriting line on stderr."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.time()
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", smoothing=0.1)
            except ImportError:
                pass

    def __call__(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif not self.quiet and (self.done % 50 == 0 or self.done == self.total):
            rate = self.done / max(time.time() - self.t0, 1e-9)
            sys.stderr.write(f"\r{self.done}/{self.total} steps  {rate:.0f} step/s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet:
            sys.stderr.write("\n")


def summarise(runs: list[Run]) -> dict:
    accs = [r.final_acc for r in runs]
    return {
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "ms_per_step": 1000 * statistics.fmean(r.step_time for r in runs),
        "accs": accs,
        "diverged": sum(r.diverged for r in runs),
    }


def print_table(rows: dict[str, dict], baseline: str | None = "scratch") -> None:
    head = f"{'student':<22}{'test acc % (mean +- std)':>26}{'min':>8}{'max':>8}"
    head += f"{'vs scratch':>12}{'ms/step':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        delta = ""
        if baseline in rows and name != baseline:
            delta = f"{100 * (r['mean'] - rows[baseline]['mean']):+.2f}"
        line = f"{name:<22}{100 * r['mean']:>17.2f} +- {100 * r['std']:<5.2f}"
        line += f"{100 * r['min']:>8.2f}{100 * r['max']:>8.2f}{delta:>12}{r['ms_per_step']:>9.2f}"
        if r.get("diverged"):
            line += f"  ({r['diverged']} run(s) hit non-finite steps)"
        print(line)


def plot(runs_by_method: dict[str, list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.4))
    ax = axes[0]
    for name, runs in runs_by_method.items():
        steps = [s for s, _ in runs[0].curve]
        acc = np.array([[a for _, a in r.curve] for r in runs]) * 100
        ax.plot(steps, acc.mean(0), label=name)
        ax.fill_between(steps, acc.min(0), acc.max(0), alpha=0.2)
    ax.set(xlabel="step", ylabel="test accuracy (%)", title="students (band: min-max over seeds)")
    ax.legend()

    mokd = runs_by_method.get("mokd")
    if mokd:

        def smooth(a: np.ndarray, k: int = 15) -> np.ndarray:
            k = max(1, min(k, len(a)))
            return np.convolve(a, np.ones(k) / k, mode="valid")

        cos = np.nanmean(np.array([r.cosines for r in mokd]), 0)
        for j, label in enumerate(["CE vs KL", "CE vs feature", "KL vs feature"]):
            axes[1].plot(smooth(cos[:, j]), label=label)
        axes[1].axhline(0, color="k", lw=0.6)
        axes[1].set(xlabel="step", ylabel="cosine", title="conflict: cos(g_i, g_j) (< 0: conflict)")
        axes[1].legend()
        ratio = np.nanmean(np.log10(np.array([r.ratios for r in mokd])), 0)
        for j, label in enumerate(["|g_KL| / |g_CE|", "|g_feature| / |g_CE|"]):
            axes[2].plot(10 ** smooth(ratio[:, j]), label=label)
        axes[2].set_yscale("log")
        axes[2].axhline(1, color="k", lw=0.6)
        axes[2].set(xlabel="step", ylabel="norm ratio", title="dominance: gradient norm ratios")
        axes[2].legend()
        pis = np.array([r.pis for r in mokd]).mean(0)
        for j, label in enumerate(["CE", "KL", "feature"]):
            axes[3].plot(smooth(pis[:, j]), label=label)
        axes[3].set(xlabel="step", ylabel="pi_k", ylim=(-0.02, 1.02),
                    title="MoKD trade-off weights pi (simplex)")  # fmt: skip
        axes[3].legend()
    fig.suptitle(
        "gradbal quickstart: digits, MoKD objectives measured by opt.last_stats (mean of seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=5, help="students per method (seeds 0..n-1)")
    p.add_argument("--n-train", type=int, default=50, help="labelled images the students see")
    p.add_argument("--student-width", type=int, default=4)
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--steps", type=int, default=400, help="student training steps")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--lr",
        type=float,
        default=0.8,
        help="SGD lr of every student (classic KD's best on the validation images, "
        "see --magnitude-study)",
    )
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--methods", default="scratch,kd,mokd")
    p.add_argument("--magnitude", default="mean_loss", choices=["mean_loss", "faithful"])
    p.add_argument("--max-norm", type=float, default=None)
    p.add_argument(
        "--gram-params",
        default="all",
        choices=["all", "shared"],
        help="parameters MoKD's Gram matrix is computed over (see the docstring)",
    )
    p.add_argument("--quick", action="store_true", help="the reduced form CI runs")
    p.add_argument("--magnitude-study", action="store_true",
                   help="tune classic KD's lr on the validation images, then compare MoKD's "
                   "magnitude policies at that lr")  # fmt: skip
    p.add_argument("--study-lrs", default="0.02,0.05,0.1,0.2,0.4")
    p.add_argument("--study-max-norm", type=float, default=0.5)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny convs: 1 is fastest)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = min(args.seeds, 3)
        args.steps = min(args.steps, 400)
        args.teacher_steps = min(args.teacher_steps, 300)
        args.eval_every = 50
    return args


def run_variant(args, data, teacher, method, progress, **opts) -> list[Run]:
    """One student configuration over every seed; ``opts`` override the command line."""
    config = {
        "width": args.student_width,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "magnitude": args.magnitude,
        "max_norm": args.max_norm,
        "gram_params": args.gram_params,
    }
    config.update(opts)
    return [
        train_student(method, seed, data, teacher, progress=progress, **config)
        for seed in range(args.seeds)
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    data = load_data(args.n_train)
    teacher = train_teacher(data, args.teacher_width, args.teacher_steps, lr=0.05)
    teacher_acc = accuracy(teacher, data.x_test, data.y_test)
    if not args.quiet:
        print(
            f"digits: {len(data.y_train)} training images (teacher), {len(data.y_student)} of "
            f"them labelled for the students, {len(data.y_test)} test images. Teacher "
            f"(width {args.teacher_width}, {sum(p.numel() for p in teacher.parameters())} "
            f"params): {100 * teacher_acc:.2f}% test accuracy, trained in "
            f"{time.time() - t_start:.1f}s. Student: width {args.student_width}, "
            f"{sum(p.numel() for p in CNN(args.student_width).parameters())} params."
        )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "teacher_acc": teacher_acc}

    if args.magnitude_study:
        result.update(magnitude_study(args, data, teacher))
    else:
        progress = Progress(len(methods) * args.seeds * args.steps, quiet=args.quiet)
        runs = {m: run_variant(args, data, teacher, m, progress) for m in methods}
        progress.close()
        rows = {name: summarise(r) for name, r in runs.items()}
        result["rows"] = rows
        if not args.quiet:
            print(
                f"\n{args.seeds} seeds, {args.steps} steps, batch {args.batch_size}, lr {args.lr}"
            )
            print_table(rows)
        if not args.no_plot:
            args.out.mkdir(parents=True, exist_ok=True)
            plot(runs, args.out / "quickstart.png")
            if not args.quiet:
                print(f"plot: {args.out / 'quickstart.png'}")
        result["runs"] = runs
    result["seconds"] = time.time() - t_start
    if not args.quiet:
        print(f"total {result['seconds']:.1f}s")
    if not args.no_plot or args.magnitude_study:
        args.out.mkdir(parents=True, exist_ok=True)
        printable = {k: v for k, v in result.items() if k != "runs"}
        (args.out / ("magnitude.json" if args.magnitude_study else "quickstart.json")).write_text(
            json.dumps(printable, indent=1)
        )
    return result


def magnitude_study(args, data, teacher) -> dict:
    """MoKD's magnitude policies at the learning rate tuned for classic KD.

    Classic KD's lr is picked on the validation images (the training half minus the
    students' subset: the students never train on them); every MoKD variant then runs at that
    lr, the situation of a user who swaps their optimizer for gradbal's and keeps their lr.
    """
    lrs = [float(v) for v in args.study_lrs.split(",")]
    mn = args.study_max_norm
    variants = [
        ("mokd mean_loss", {"magnitude": "mean_loss"}),
        ("mokd faithful", {"magnitude": "faithful"}),
        (f"mokd mean_loss clip{mn:g}", {"magnitude": "mean_loss", "max_norm": mn}),
        (f"mokd faithful clip{mn:g}", {"magnitude": "faithful", "max_norm": mn}),
        ("mokd mean_loss shared", {"magnitude": "mean_loss", "gram_params": "shared"}),
        ("mokd faithful shared", {"magnitude": "faithful", "gram_params": "shared"}),
        ("mokd mean_loss [CE,KL]", {"magnitude": "mean_loss", "feature_objective": False}),
        ("mokd faithful [CE,KL]", {"magnitude": "faithful", "feature_objective": False}),
    ]
    progress = Progress((len(lrs) + 1 + len(variants)) * args.seeds * args.steps, args.quiet)
    sweep = {}
    for lr in lrs:
        sweep[lr] = run_variant(args, data, teacher, "kd", progress, lr=lr)
    val = {lr: statistics.fmean(r.val_acc for r in runs) for lr, runs in sweep.items()}
    best = max(lrs, key=lambda lr: val[lr])
    runs = {"scratch": run_variant(args, data, teacher, "scratch", progress, lr=best)}
    runs["kd"] = sweep[best]
    for name, opts in variants:
        runs[name] = run_variant(args, data, teacher, "mokd", progress, lr=best, **opts)
    progress.close()
    rows = {name: summarise(r) for name, r in runs.items()}
    if not args.quiet:
        print("\nclassic KD lr sweep (mean over seeds):")
        for lr in lrs:
            test = statistics.fmean(r.final_acc for r in sweep[lr])
            mark = "  <- chosen" if lr == best else ""
            print(f"  lr {lr:<6g} val {100 * val[lr]:6.2f}%  test {100 * test:6.2f}%{mark}")
        print(
            f"\nall at lr {best:g} (tuned for classic KD), {args.seeds} seeds, {args.steps} steps"
        )
        print_table(rows)
    return {"kd_lr_sweep_val": val, "chosen_lr": best, "rows": rows}


if __name__ == "__main__":
    main()
