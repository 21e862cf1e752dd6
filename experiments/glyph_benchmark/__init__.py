"""The glyph-scene benchmark: whether distillation methods can be told apart on it, then CovMatch measured on it."""
