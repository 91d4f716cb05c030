"""The floor every layer stands on: the feature contract (raw value → table row or dense value), the bundle
manifest, the request schema derived from it, the registry policy, and two neutral modules, the config
schema and cluster start-up. It imports no other adsfm layer and no torch (.importlinter checks both)."""
