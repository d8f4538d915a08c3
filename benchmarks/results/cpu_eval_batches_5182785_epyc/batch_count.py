"""Evaluation batches of one view shape against fixed cuts of the evaluation batch, on the shared data (file headers only).

    PYTHONPATH=src python benchmarks/results/cpu_eval_batches_5182785_epyc/batch_count.py
"""
import math

import numpy as np

from finescope.config import load_config
from finescope.data import load_samples
from finescope.trainer import make_loader

for conf, root in (("configs/defungi.yaml", "../shared/data/defungi"), ("configs/breakhis_protocol.yaml", "../shared/data/breakhis")):
    for vm in (1, 32):
        cfg = load_config(conf, [f"data.root={root}", "data.num_workers=0", "data.cache=none", f"model.view_multiple={vm}"])
        s = load_samples(cfg.data)
        loader = make_loader(s, np.arange(len(s.samples)), cfg, train=False)
        bs = cfg.train.eval_batch_size or cfg.train.batch_size
        print(conf, "view_multiple", vm, "images", len(s.samples), "batch", bs, "batches", len(loader.batch_sampler), "fixed cuts", math.ceil(len(s.samples) / bs))
