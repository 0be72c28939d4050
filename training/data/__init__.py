"""Data sets for training and evaluating ShapNets: one call gives seeded splits plus a JSON-able record.

```python
from training.data import load_dataset
bundle = load_dataset("adult", root="/data", seed=0)   # root=None -> $SHAPNETS_DATA
x, y = bundle.train[0]                                   # float32 (12,), int64 scalar
bundle.info.to_dict()                                    # shapes, names, preprocessing, reference, split
```

Tabular sets are z-scored with train statistics (reference 0 = the train mean); images are scaled to [0, 1]
and normalised with fixed per-channel constants. Nothing is ever downloaded.

Own data: `load_dataset("csv", path="t.csv", target="label")` and `load_dataset("image_folder", path="imgs/")`
(see `training.data.own` and docs/own_data.md).
"""

from .core import DATA_ENV, ArrayDataset, DataBundle, DatasetInfo
from .images import read_idx
from .registry import list_datasets, load_dataset
from .synthetic import synthetic_tabular_scores
from .tabular import raw_values

__all__ = [
    "DATA_ENV",
    "ArrayDataset",
    "DataBundle",
    "DatasetInfo",
    "list_datasets",
    "load_dataset",
    "raw_values",
    "read_idx",
    "synthetic_tabular_scores",
]
