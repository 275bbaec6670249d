"""Collapse monitoring: metrics of embeddings, alarms, TensorBoard logging and the web dashboard."""

from sslkit.monitor.alarms import AlarmEvent, AlarmTracker, default_alarms
from sslkit.monitor.dashboard import dashboard_main, serve_dashboard, write_html
from sslkit.monitor.metrics import (
    collapse_statistics,
    effective_rank,
    embedding_std,
    mean_pairwise_cosine,
    teacher_student_cosine,
)
from sslkit.monitor.monitor import Monitor, probe_embeddings, probe_statistics

__all__ = [
    "AlarmEvent", "AlarmTracker", "Monitor", "collapse_statistics", "dashboard_main",
    "default_alarms", "effective_rank", "embedding_std", "mean_pairwise_cosine", "probe_embeddings",
    "probe_statistics", "serve_dashboard", "teacher_student_cosine", "write_html",
]
