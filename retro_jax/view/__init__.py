"""`retro-jax view`: a self-contained HTML report of what a Retro-Search (or tree) run changed, record by record.

- `records`: what the page shows of each output record (index entry, detail, run statistics);
- `histogram`: trace length before and after as inline SVG;
- `report`: the page itself (records in lazily parsed JSON chunks, inline CSS and JS from `static/`);
- `cli`: `retro-jax view`.
"""
