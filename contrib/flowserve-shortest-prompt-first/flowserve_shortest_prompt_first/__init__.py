"""flowserve-shortest-prompt-first: the batch scheduler ``shortest-prompt-first`` (see ``plugin``)."""
