"""Per-token advantage analysis: records, region statistics, plots (PNG), token heatmap (HTML), ``sdlit analyze``."""

from sdlit.analysis.plots import plot_advantages, write_heatmap
from sdlit.analysis.records import TokenRecord, read_records, token_texts, write_records
from sdlit.analysis.regions import REGIONS, RegionStats, region_bounds
from sdlit.analysis.report import AnalysisOutputs, group_records, region_rows, write_outputs

__all__ = [
    "AnalysisOutputs", "REGIONS", "RegionStats", "TokenRecord", "group_records", "plot_advantages", "read_records",
    "region_bounds", "region_rows", "token_texts", "write_heatmap", "write_outputs", "write_records",
]
