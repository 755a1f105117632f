"""Training: pure step functions (steps.py), the optimiser (optim.py), gradient sync across
ranks (parallel.py), Ray Train pretraining (pretrain.py, with board.py, the actor its driver and
workers talk through) and fine-tuning (finetune.py)."""
