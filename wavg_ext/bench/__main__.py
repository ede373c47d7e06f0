"""``python -m wavg_ext.bench``: the command line (:func:`wavg_ext.bench.ops.main`)."""

from .ops import main

if __name__ == "__main__":
    main()
