"""Evaluation: teacher-forced metrics (KL to the teacher, cross-entropy) and sample generations."""
