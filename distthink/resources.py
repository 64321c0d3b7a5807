"""Where the package data lives (shipped inside the wheel, so every path works from `pip install .`)."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS = PACKAGE_DIR / "assets"          # bundled sample data, the tiny tokenizer, the molecule demo set
CHAT_TEMPLATES = PACKAGE_DIR / "templates"  # chat templates of the tiny tokenizer families
SLURM_TEMPLATES = PACKAGE_DIR / "launch" / "templates"  # sbatch templates + launch.sh (the repo's slurm/ is a copy)
MODEL_CONFIGS = PACKAGE_DIR / "launch" / "model_configs"  # config.json of the models the shipped configs name
