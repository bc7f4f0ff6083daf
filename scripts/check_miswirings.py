"""Apply known miswirings of the model and its training loop one at a time; each must make the tests fail.

Every entry of `MISWIRINGS` is a small edit of `comp/` that leaves the code running but wrong (a prompt half
swapped, a mask dropped, a leak, ...). For each, the project is copied to a temporary folder, the edit is
applied there (the working tree is never touched) and the model, loss, modulator, mask, metric, training and
golden suites run with `-x`. The script prints one line per miswiring and exits 1 if any of them survives.

    python scripts/check_miswirings.py            # all of them (a few minutes on 2 cores)
    python scripts/check_miswirings.py 3 9        # only these (1-based)
    python scripts/check_miswirings.py --quick    # only the tests written for each one (about a minute)
    python scripts/check_miswirings.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("comp", "pipeline", "extractors", "tests", "configs", "pyproject.toml")
# fastest first: -x stops at the first failure
SUITES = ("tests/test_golden.py", "tests/test_losses.py", "tests/test_model.py", "tests/test_modulator.py",
          "tests/test_masks.py", "tests/test_metrics.py", "tests/test_train.py")


@dataclass(frozen=True)
class Miswiring:
    what: str
    path: str
    old: str
    new: str
    caught_by: tuple[str, ...] = ()  # the tests written for it (`--quick` runs only these)


MISWIRINGS = (
    Miswiring("the two back-projected prompt halves swapped in the momentum mix", "comp/model.py",
              "mixed = lam * back + (1 - lam) * cross_prompts(prompts2)",
              "mixed = lam * torch.cat((back[..., self.cfg.prompt_dim:], back[..., :self.cfg.prompt_dim]), -1)"
              " + (1 - lam) * cross_prompts(prompts2)", ("tests/test_golden.py",)),
    Miswiring("stage-1 private branch fed the text private code instead of audio's", "comp/model.py",
              "priv = priv[:1].expand(N_MOD, -1, -1)", "priv = priv[1:2].expand(N_MOD, -1, -1)",
              ("tests/test_golden.py",)),
    Miswiring("the gradient modulator's call removed from the training loop", "comp/train.py",
              "        fitter.modulator.apply(out, batch)\n", "        pass\n",
              ("tests/test_train.py::test_gradient_modulator_acts_in_the_training_loop",)),
    Miswiring("faithful's fuse-absent-modalities default flipped", "comp/config.py",
              "fuse_absent=True, unused_params=True", "fuse_absent=False, unused_params=True",
              ("tests/test_golden.py", "tests/test_model.py::test_variant_defaults_follow_the_documented_table")),
    Miswiring("disentangling loss on private codes only (no shared vs private terms)", "comp/losses.py",
              "abs_cosine(private[i], shared[i], real) \\\n                + abs_cosine(private[j], shared[j], real)",
              "abs_cosine(private[i], private[j], real) \\\n                + abs_cosine(private[j], private[i], real)",
              ("tests/test_losses.py::test_disentangling_separates_shared_from_private_not_only_private_pairs",
               "tests/test_golden.py")),
    Miswiring("clean prompts no longer zeroed for absent modalities", "comp/prompts.py",
              "        if present is not None:\n            prompt = prompt *",
              "        if False:\n            prompt = prompt *",
              ("tests/test_model.py::test_clean_prompts_of_absent_modalities_are_zero",)),
    Miswiring("clean prototypes built from absent instances too", "comp/model.py",
              "member = present_rows if q.prompt_mask else torch.ones_like(present_rows)",
              "member = torch.ones_like(present_rows)",
              ("tests/test_model.py::test_clean_prototypes_learn_from_present_instances_only",)),
    Miswiring("regression anti-label noise set to zero", "comp/losses.py",
              "ANTI_LABEL_SCALE = 1.5", "ANTI_LABEL_SCALE = 0.0",
              ("tests/test_losses.py::test_regression_anti_label_targets_random_sentiment",)),
    Miswiring("feature normaliser fitted on train + val + test", "comp/train.py",
              "normalizer = Normalizer.fit(train_c)", "normalizer = Normalizer.fit(list(conversations))",
              ("tests/test_train.py::test_normalizer_is_fitted_on_training_conversations_only",)),
    Miswiring("faithful test batches left unmasked", "comp/train.py",
              "batches = (mask_batch(item, cond, rng)[0]", "batches = (item",
              ("tests/test_train.py::test_faithful_test_batches_are_masked_afresh_every_epoch",)),
    Miswiring("attention keys masked by padding only, not by presence", "comp/model.py",
              "layout = Layout.from_valid(valid, present.permute(2, 0, 1))",
              "layout = Layout.from_valid(valid, valid[None].expand(N_MOD, -1, -1))",
              ("tests/test_model.py::test_an_absent_modality_is_not_attended_to",
               "tests/test_model.py::test_clean_utterance_with_nothing_present_leaves_the_others_alone")),
)


def _copy_project(dest: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


def _apply(dest: Path, m: Miswiring) -> None:
    path = dest / m.path
    text = path.read_text(encoding="utf-8")
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.path}: the text to replace for {m.what!r} occurs {text.count(m.old)} times; "
                         "update scripts/check_miswirings.py to the current code")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def run(m: Miswiring | None, tests: tuple[str, ...] = SUITES) -> tuple[bool, str, float]:
    """(tests failed, last line of pytest's output, seconds) with `m` applied (None: unmodified)."""
    with tempfile.TemporaryDirectory(prefix="miswiring-") as tmp:
        dest = Path(tmp)
        _copy_project(dest)
        if m is not None:
            _apply(dest, m)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=dest, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        return proc.returncode != 0, (lines[-1] if lines else proc.stderr.strip()[-200:]), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="*", type=int, help="1-based numbers of the miswirings to apply (default: all)")
    p.add_argument("--list", action="store_true", help="list the miswirings and exit")
    p.add_argument("--baseline", action="store_true", help="first check that the unmodified copy passes")
    p.add_argument("--quick", action="store_true",
                   help="run only the tests written for each miswiring (seconds each) instead of the whole suites")
    args = p.parse_args(argv)
    if args.list:
        for i, m in enumerate(MISWIRINGS, 1):
            print(f"{i:2d}. {m.what} ({m.path})")
        return 0
    if args.baseline:
        failed, last, secs = run(None)
        print(f" 0. unmodified: {'FAILS' if failed else 'passes'} ({last}, {secs:.0f}s)", flush=True)
        if failed:
            return 1
    chosen = args.which or list(range(1, len(MISWIRINGS) + 1))
    survivors = []
    for i in chosen:
        m = MISWIRINGS[i - 1]
        failed, last, secs = run(m, m.caught_by if args.quick else SUITES)
        print(f"{i:2d}. {m.what}: {'caught' if failed else 'SURVIVED'} ({last}, {secs:.0f}s)", flush=True)
        if not failed:
            survivors.append(i)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} miswirings caught"
          + (f"; survivors: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
