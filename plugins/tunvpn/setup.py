"""The C fast path of kairos-plugin-tunvpn; everything else is declared in pyproject.toml.

The per-packet loops in C (OpenSSL's libcrypto; Debian: libssl-dev). Optional: without a
compiler the plugin installs and runs on the pure-Python path. Declared here because setuptools
still calls ``[tool.setuptools.ext-modules]`` in pyproject.toml experimental and warns on every
build.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kairos_plugin_tunvpn._fastpath",
            sources=["kairos_plugin_tunvpn/_fastpath.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall"],
            optional=True,
        )
    ]
)
