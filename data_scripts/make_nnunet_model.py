#!/usr/bin/env python
"""Build a small but real nnU-Net v2 model folder on CPU, with nnU-Net itself.

Steps (each one nnU-Net's own code; needs ``pip install 'volattack[nnunet]'``):

1. synthetic abdominal-CT phantoms (:mod:`volattack.data.phantoms`) written in nnU-Net's raw
   format: ``nnUNet_raw/DatasetNNN_VolattackPhantoms/imagesTr/case_XXX_0000.nii.gz`` (int16 HU),
   ``labelsTr/case_XXX.nii.gz`` (uint8), ``dataset.json`` (channel ``CT``, label names), plus
   held-out ``imagesTs/`` and ``labelsTs/`` cases and volattack's ``datalist.json`` of them;
2. ``nnUNetv2_plan_and_preprocess -d NNN -c 3d_fullres -np 1`` (fingerprint, plans, preprocessing);
   then the plans' network widths are scaled down to base width ``--base-width`` (same topology,
   a network small enough to train on one CPU thread in minutes);
3. a short training of fold ``--fold`` with the trainer ``nnUNetTrainer_volattack`` (a subclass of
   ``nnUNetTrainer``: ``--epochs`` x ``--iters`` iterations, Adam at ``--lr`` with nnU-Net's poly
   decay, mirroring augmentation and test-time mirroring on nnU-Net's axis 0 only), run through
   nnU-Net's ``run_training`` (the function behind ``nnUNetv2_train ... -device cpu``) on
   ``--threads`` threads.

Where the trainer lives: nnU-Net finds a trainer by class name, searching the modules of
``nnunetv2/training/nnUNetTrainer/`` first and only then its sub-packages (one of which imports
``timm`` and so ``torchvision``, which fails to load beside a CPU-only torch). This script
therefore writes the trainer as the top-level module
``nnunetv2/training/nnUNetTrainer/nnUNetTrainer_volattack.py`` of the installed nnunetv2 (the
place nnU-Net's documentation gives for custom trainers; ``--trainer-dir`` prints it). Both
``nnUNetv2_train`` and ``nnUNetPredictor.initialize_from_trained_model_folder`` find it there.
Delete that file to uninstall it.

Usage::

    OMP_NUM_THREADS=1 python data_scripts/make_nnunet_model.py runs/nnunet --n 20 --size 48 48 48

The model folder (``dataset.json``, ``plans.json``, ``fold_0/checkpoint_final.pth``) is
``OUT/nnUNet_results/DatasetNNN_VolattackPhantoms/nnUNetTrainer_volattack__nnUNetPlans__3d_fullres``;
its path is printed last and written to ``OUT/model_folder.txt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger("make_nnunet_model")

TRAINER = "nnUNetTrainer_volattack"
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"

TRAINER_SOURCE = '''"""Short CPU training for tiny volattack phantom models (written by volattack's
data_scripts/make_nnunet_model.py; safe to delete)."""
import os

import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_volattack(nnUNetTrainer):
    """nnUNetTrainer with few epochs and iterations, Adam + poly decay, mirroring on axis 0."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("VOLATTACK_NNUNET_EPOCHS", "24"))
        self.num_iterations_per_epoch = int(os.environ.get("VOLATTACK_NNUNET_ITERS", "30"))
        self.num_val_iterations_per_epoch = int(os.environ.get("VOLATTACK_NNUNET_VAL_ITERS", "5"))
        self.initial_lr = float(os.environ.get("VOLATTACK_NNUNET_LR", "3e-3"))
        self.save_every = 1  # checkpoint_latest.pth after every epoch

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rot, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = (0,)
        return rot, dummy_2d, initial_patch_size, (0,)
'''


def trainer_path() -> Path:
    """Where the trainer module goes: top level of the installed ``nnunetv2.training.nnUNetTrainer``."""
    import nnunetv2

    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / f"{TRAINER}.py"


def install_trainer() -> Path:
    """Write (or refresh) the trainer module; returns its path."""
    from volattack.utils import atomic_write_text

    path = trainer_path()
    if not path.exists() or path.read_text() != TRAINER_SOURCE:
        atomic_write_text(path, TRAINER_SOURCE)
        logger.info("wrote the trainer module %s", path)
    return path


def dataset_name(dataset_id: int) -> str:
    """nnU-Net's folder name of the dataset."""
    return f"Dataset{dataset_id:03d}_VolattackPhantoms"


def _write_case(folder_img: Path, folder_lab: Optional[Path], case: str, ph: Any) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.clip(np.round(ph.image), -32768, 32767).astype(np.int16), ph.affine)
    img.set_sform(ph.affine, code=1)
    img.set_qform(ph.affine, code=1)
    nib.save(img, str(folder_img / f"{case}_0000.nii.gz"))
    if folder_lab is not None:
        lab = nib.Nifti1Image(ph.label.astype(np.uint8), ph.affine)
        lab.set_sform(ph.affine, code=1)
        lab.set_qform(ph.affine, code=1)
        nib.save(lab, str(folder_lab / f"{case}.nii.gz"))


def write_raw_dataset(raw: Path, dataset_id: int, n_train: int, n_test: int, size: Sequence[int],
                      seed: int) -> Path:
    """Phantoms in nnU-Net's raw layout (training cases, then held-out test cases with labels).

    Returns:
        The dataset folder ``raw/DatasetNNN_VolattackPhantoms``.
    """
    from volattack.data.phantoms import CLASS_NAMES, case_seed, generate_phantom
    from volattack.utils import atomic_write_json

    root = raw / dataset_name(dataset_id)
    folders = {k: root / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):
        ph = generate_phantom(case_seed(seed, i), size=size)
        train = i < n_train
        _write_case(folders["imagesTr" if train else "imagesTs"], folders["labelsTr" if train else "labelsTs"],
                    f"case_{i:03d}", ph)
    atomic_write_json(root / "dataset.json", {
        "name": dataset_name(dataset_id), "description": "volattack synthetic abdominal CT phantoms (HU)",
        "channel_names": {"0": "CT"}, "labels": {name: int(k) for k, name in sorted(CLASS_NAMES.items())},
        "numTraining": int(n_train), "file_ending": ".nii.gz",
    })
    test = [{"image": f"imagesTs/case_{i:03d}_0000.nii.gz", "label": f"labelsTs/case_{i:03d}.nii.gz",
             "subject": f"case_{i:03d}"} for i in range(n_train, n_train + n_test)]
    atomic_write_json(root / "datalist.json", {  # volattack's datalist of the held-out cases
        "name": dataset_name(dataset_id), "labels": {str(k): v for k, v in sorted(CLASS_NAMES.items())},
        "training": [], "validation": [], "test": test})
    logger.info("wrote %d training and %d test phantoms to %s", n_train, n_test, root)
    return root


def nnunet_env(out: Path, threads: int) -> dict[str, str]:
    """Environment of the nnU-Net steps: its three folders under ``out``, one process each."""
    env = dict(os.environ)
    env.update(nnUNet_raw=str(out / "nnUNet_raw"), nnUNet_preprocessed=str(out / "nnUNet_preprocessed"),
               nnUNet_results=str(out / "nnUNet_results"), nnUNet_def_n_proc="1", OMP_NUM_THREADS=str(threads))
    env["nnUNet_n_proc_DA"] = "1"  # planning crashes with 0 (torch.set_num_threads(0))
    return env


def plan_and_preprocess(dataset_id: int, env: dict[str, str]) -> None:
    """``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np 1`` (the venv's entry point)."""
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    cmd = [str(exe) if exe.exists() else "nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c",
           CONFIGURATION, "-np", "1", "--verify_dataset_integrity"]
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, env=env, check=True)


def shrink_plans(plans_file: Path, base_width: int, max_width: int = 128) -> dict:
    """Scale the 3d_fullres network widths to ``base_width * 2**stage`` (capped at ``max_width``)."""
    from volattack.utils import atomic_write_json

    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(base_width * 2 ** s, max_width) for s in range(len(arch["features_per_stage"]))]
    atomic_write_json(plans_file, plans)
    logger.info("network widths %s, patch size %s", arch["features_per_stage"],
                plans["configurations"][CONFIGURATION]["patch_size"])
    return plans


def train(dataset_id: int, fold: int, env: dict[str, str], threads: int) -> None:
    """nnU-Net's ``run_training`` (what ``nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainer_volattack
    -device cpu`` runs, here on ``threads`` threads instead of every core)."""
    os.environ.update(env)
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (no workers)
    import torch

    torch.set_num_threads(threads)
    from nnunetv2.run.run_training import run_training

    run_training(str(dataset_id), CONFIGURATION, fold, TRAINER, PLANS, device=torch.device("cpu"))


def model_folder(out: Path, dataset_id: int) -> Path:
    """The trained model folder (``dataset.json``, ``plans.json``, ``fold_k/``)."""
    return out / "nnUNet_results" / dataset_name(dataset_id) / f"{TRAINER}__{PLANS}__{CONFIGURATION}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (no heavy imports)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", nargs="?", help="output folder (nnUNet_raw/, nnUNet_preprocessed/, nnUNet_results/)")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (3 digits)")
    p.add_argument("--n", type=int, default=20, help="training phantoms")
    p.add_argument("--n-test", type=int, default=4, help="held-out test phantoms (imagesTs/, labelsTs/)")
    p.add_argument("--size", type=int, nargs=3, default=(48, 48, 48), metavar=("I", "J", "K"))
    p.add_argument("--seed", type=int, default=0, help="phantom dataset seed")
    p.add_argument("--base-width", type=int, default=8, help="network width of the first stage")
    p.add_argument("--fold", type=int, default=0, help="cross-validation fold to train")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--iters", type=int, default=30, help="iterations per epoch")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training")
    p.add_argument("--skip-training", action="store_true", help="stop after planning and preprocessing")
    p.add_argument("--trainer-dir", action="store_true", help="print where the trainer module goes and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the model folder; prints its path. 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.trainer_dir:
        print(trainer_path())
        return 0
    if args.out is None or not 100 <= args.dataset_id <= 999 or args.n < 2 or min(args.size) < 16:
        print("error: need OUT, a 3-digit --dataset-id, --n >= 2 and --size >= 16", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    env = nnunet_env(out, args.threads)
    env.update(VOLATTACK_NNUNET_EPOCHS=str(args.epochs), VOLATTACK_NNUNET_ITERS=str(args.iters),
               VOLATTACK_NNUNET_LR=str(args.lr))
    t0 = time.time()
    install_trainer()
    write_raw_dataset(out / "nnUNet_raw", args.dataset_id, args.n, args.n_test, args.size, args.seed)
    plan_and_preprocess(args.dataset_id, env)
    shrink_plans(out / "nnUNet_preprocessed" / dataset_name(args.dataset_id) / f"{PLANS}.json", args.base_width)
    logger.info("planned and preprocessed in %.0f s", time.time() - t0)
    if args.skip_training:
        return 0
    train(args.dataset_id, args.fold, env, args.threads)
    folder = model_folder(out, args.dataset_id)
    from volattack.utils import atomic_write_text

    atomic_write_text(out / "model_folder.txt", str(folder) + "\n")
    logger.info("trained in %.0f s total", time.time() - t0)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
