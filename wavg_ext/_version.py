# The release this source tree is: the one place wavg_ext's version is written. A build
# from a git checkout appends the commit (build_backend/wavg_ext_version.py); the
# installed package's wavg_ext.__version__ is the version it was built as.
__version__ = "0.1.0"
