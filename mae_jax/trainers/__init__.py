"""Trainers: pretraining (pretrain, its step in pretrain_step), fine-tuning and linear probing
(finetune), offline evaluation (evaluate) and the label-efficiency study (study, study_report)."""
