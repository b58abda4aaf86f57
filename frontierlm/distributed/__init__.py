"""Training across islands that sync rarely: DiLoCo, Streaming DiLoCo, decoupled islands."""
