"""Model layer: config parsing, layers, architectures, checkpoint loading, sampling. Architectures
register in nanoslg.core.registry.ARCHITECTURES."""
