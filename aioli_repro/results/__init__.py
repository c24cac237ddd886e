"""Results: loading run summaries and W&B logs, statistics, tables, plots and claims."""
