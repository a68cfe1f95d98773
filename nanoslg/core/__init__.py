"""The vocabulary every layer shares: sequences, sampling parameters, step plans, the rank's dist
state, errors, the config schema and the plugin registries. It imports nothing else of NanoSLG."""
