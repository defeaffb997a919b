"""What only the notebooks use: the series' plot style and the interactive α explorer."""
