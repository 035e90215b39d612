"""Performance benchmarks; each module has ``run(quick: bool = False) -> list[dict]`` rows."""
