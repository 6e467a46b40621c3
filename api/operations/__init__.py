"""Running the service: health, metrics, cache bookkeeping and administration, house-keeping."""
