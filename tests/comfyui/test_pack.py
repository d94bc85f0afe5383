"""The pack as ComfyUI sees it: loaded by ComfyUI's own loader, every node's V3 schema valid and documented."""

import pytest

CATEGORY = "causal counterfactuals"


@pytest.fixture(scope="module")
def pack(comfyui):
    return comfyui.pack_module("nodes")


def test_comfyui_loads_the_pack_and_registers_every_node(comfyui, pack):
    import folder_paths

    declared = {node.GET_SCHEMA().node_id for node in pack.NODES}
    assert set(comfyui.pack_nodes) == declared
    for node_id in declared:
        assert comfyui.node_class(node_id).RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
        assert comfyui.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert "LLM" in folder_paths.folder_names_and_paths  # models/LLM, for local VLM folders


def test_every_node_is_documented_and_every_input_has_a_tooltip(pack):
    for node in pack.NODES:
        schema = node.GET_SCHEMA()  # ComfyUI's own validation of the schema
        assert schema.description.strip(), f"{schema.node_id} has no description"
        assert schema.category == CATEGORY or schema.category.startswith(f"{CATEGORY}/"), schema.category
        assert schema.display_name
        for socket in schema.inputs:
            assert socket.tooltip and socket.tooltip.strip(), f"{schema.node_id}.{socket.id} has no tooltip"
        assert schema.outputs, f"{schema.node_id} has no outputs"


def test_input_types_are_what_the_frontend_and_validator_read(comfyui, pack):
    for node in pack.NODES:
        node_id = node.GET_SCHEMA().node_id
        info = comfyui.node_class(node_id).INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} lost its tooltip in INPUT_TYPES"


SOCKET_PREFIX = "CSG_"


def test_every_custom_socket_type_carries_the_pack_prefix(pack):
    """Socket type names are global in ComfyUI: ours start with CSG_, so no other pack's types meet them."""
    from comfy_api.latest import io

    builtin = {value.io_type for value in vars(io).values() if isinstance(getattr(value, "io_type", None), str)}
    custom = {socket.io_type for node in pack.NODES for schema in [node.GET_SCHEMA()]
              for socket in [*schema.inputs, *schema.outputs]} - builtin
    assert custom, "the pack declares custom socket types (inversion, graph, interventions, VLM)"
    assert sorted(name for name in custom if not name.startswith(SOCKET_PREFIX)) == []


NODE_MODULES = ("graph_nodes", "vlm_nodes", "csg_nodes", "sampling_nodes", "baseline_nodes", "evaluation_nodes",
                "instruction_nodes")


def test_the_pack_registers_exactly_the_nodes_each_module_lists(comfyui, pack):
    """One source of truth: each module's NODES names every node class it defines, and the pack is their union."""
    from comfy_api.latest import io

    listed = []
    for name in NODE_MODULES:
        module = comfyui.pack_module(f"nodes.{name}")
        defined = {value for value in vars(module).values() if isinstance(value, type)
                   and issubclass(value, io.ComfyNode) and value.__module__ == module.__name__}
        assert set(module.NODES) == defined, f"nodes/{name}.py: NODES must list every node class it defines"
        listed += module.NODES
    assert pack.NODES == listed
