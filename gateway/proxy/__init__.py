"""The proxy front ends: listeners, their sans-IO machines and Twisted adapters, the splice, the stream opener."""
