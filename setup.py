"""Packaging for the cluster tunnel gateway."""

from setuptools import find_packages, setup

setup(
    name="cluster-tunnel-gateway",
    version="0.1.0",
    description=(
        "SSH tunnel gateway on Twisted: SOCKS5 and HTTP proxy listeners in front "
        "of one SSH connection per cluster"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Every package sits where its name says under the project root, and
    # saying so (package_dir) makes a plain `pip install -e .` put that root on
    # sys.path, as a wheel puts site-packages: Twisted finds the dropin in
    # <root>/twisted/plugins.  Without it setuptools installs an import hook
    # that only knows package names, and twistd never sees the dropin.
    package_dir={"": "."},
    packages=find_packages(include=["gateway", "gateway.*"]) + ["twisted.plugins"],
    # py.typed: the package's annotations are checked (`make lint`), so its
    # users' type checkers may read them (PEP 561).
    package_data={"twisted.plugins": ["gateway_plugin.py"], "gateway": ["py.typed"]},
    install_requires=[
        # Tested against 26.10.  gateway/ssh/_conch.py relies on Conch internals
        # that Twisted's deprecation policy does not cover, so the range stops
        # short of the next year's releases; tests/test_conch_pins.py and tox's
        # twisted-trunk environment show what a newer Twisted breaks.
        "twisted[conch,tls]>=26.10,<27",
        "treq",
        "pyopenssl",
        "service-identity",
        "prometheus_client",
    ],
    extras_require={
        # asyncssh: the one server here that speaks mlkem768x25519-sha256 (tests/test_kex_interop.py).
        "test": ["hypothesis", "requests[socks]", "paramiko", "asyncssh", "ruff", "mypy", "mypy-zope"],
        # A third proxy for bench/ to compare with (bench/asyncssh_socks.py).
        "bench": ["asyncssh"],
    },
    entry_points={
        "console_scripts": [
            "gateway-connect = gateway.scripts.connect:main",
            "gateway-ctl = gateway.scripts.ctl:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
