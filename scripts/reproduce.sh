#!/usr/bin/env bash
# Placeholder until the experiments land: says so instead of pretending.
echo "make reproduce: the Figure 1 experiment is not implemented yet (see issue 'Experiments platform')." >&2
exit 1
