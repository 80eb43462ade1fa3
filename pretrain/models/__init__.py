"""DeBERTa backbone (`deberta`), task heads (`heads`) and the RTD generator/discriminator pair (`rtd`)."""

from pretrain.models.deberta import DebertaConfig, DebertaModel, preset
from pretrain.models.rtd import RTDConfig, RTDModel, RTDOutput

__all__ = ["DebertaConfig", "DebertaModel", "RTDConfig", "RTDModel", "RTDOutput", "preset"]
