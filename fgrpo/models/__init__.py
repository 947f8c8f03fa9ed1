"""Flow models behind one interface (`FlowModel`), and the loader that picks one from a config."""

from fgrpo.models.base import FlowModel, PromptEmbeds, load_model

__all__ = ["FlowModel", "PromptEmbeds", "load_model"]
