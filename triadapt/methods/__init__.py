from triadapt.methods.base import Method, RunContext, available_methods, build_method, register_method

__all__ = ["Method", "RunContext", "available_methods", "build_method", "register_method"]
