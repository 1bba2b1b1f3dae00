"""The test suite, one folder per package (data, model, ops, pretrain); helpers are imported as
``tests.<folder>.<module>``."""
