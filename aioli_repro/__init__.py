"""aioli_repro: reproduce and compare LM data-mixing methods (Aioli, ICLR 2025)."""

__version__ = "0.1.0"
