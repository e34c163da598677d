import os
import sys

# The executable spec (reference/) lives beside the package, outside the install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
