"""Benchmarks (``make bench``): each module prints markdown table rows; ``python -m bench`` collects them."""
