"""Task graphs as Ray's `ray.dag` builds them: `.bind()` nodes, `InputNode`, `execute`.

```python
with InputNode() as inp:
    dag = combine.bind(model.forward.bind(inp[0]), preprocess.bind(inp.x))
ref = dag.execute(1, x=2)
```
"""

from redray.dag.class_node import (
    PARENT_CLASS_NODE_KEY,
    PREV_CLASS_METHOD_CALL_KEY,
    ClassMethodNode,
    ClassNode,
)
from redray.dag.dag_node import DAGNode
from redray.dag.function_node import FunctionNode
from redray.dag.input_node import DAGInputData, InputAttributeNode, InputNode
from redray.dag.output_node import MultiOutputNode

__all__ = [
    "PARENT_CLASS_NODE_KEY",
    "PREV_CLASS_METHOD_CALL_KEY",
    "ClassMethodNode",
    "ClassNode",
    "DAGInputData",
    "DAGNode",
    "FunctionNode",
    "InputAttributeNode",
    "InputNode",
    "MultiOutputNode",
]
