"""The voicelm voice demo (Gradio): `python demo_app.py [--pipeline DIR | --random-tiny] [--host] [--port]`.

Same as `voicelm demo`; see voicelm/demo.py. With the environment variable CI=true it starts,
checks that it serves (HTTP 200 on its page, a text turn gives text and audio), prints
"voicelm demo: CI check passed ..." and exits 0 instead of serving forever.
"""

import argparse
import sys

from voicelm import demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="demo_app.py", description="voicelm Gradio voice demo")
    demo.add_arguments(parser)
    sys.exit(demo.main(parser.parse_args()))
