"""Training, evaluation and the `shapnets` command line for the models in `shapnets` and `zoo`.

```python
from training import load_config
from training.trainer import train

cfg = load_config("configs/shallow_breast_cancer.yaml", ["train.epochs=5"])
result = train(cfg, output_dir="runs/bc")          # last.pt, best.pt, metrics.csv, summary.json ...
```

Modules: `config` (typed YAML configs), `trainer` (the loop), `checkpoint` (atomic, resumable checkpoints),
`losses` (cross-entropy + registered loss terms), `distributed` (torchrun / DDP), `cli` (`shapnets ...`),
`data` (data sets), `plots` (explanation plots).
"""

from .config import ConfigError, ExperimentConfig, UserError, load_config, save_config

__all__ = ["ConfigError", "ExperimentConfig", "UserError", "load_config", "save_config"]
