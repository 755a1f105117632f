"""Training: pure step functions (steps.py), Ray Train pretraining (pretrain.py),
fine-tuning (finetune.py), and Ray start-up (launch.py)."""
