"""API-compatible shims so engines written against other kernel libraries can swap imports.

    from leankernels.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache
"""
