"""pretrain: DeBERTa-v3-style encoders pretrained with ELECTRA replaced-token detection."""

__version__ = "0.1.0"
