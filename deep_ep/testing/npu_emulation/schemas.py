"""Operator schemas of the torch_npu ops the Ascend backend calls: test data, kept verbatim with their source.

Source: the PyPI wheel torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl
(sha256 7736f7d82cf9f16c7dfc4537f7e7c638153da760273a193455e70857f912189e), file
torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml, the `- func:` entries of the four ops (lines
612-618 of that file). These are the signatures `torch.ops.npu.<op>` registers in torch-npu 2.14.0 (the
release that pairs with torch 2.14). The same file in the Ascend/op-plugin repository
(op_plugin/config/op_plugin_functions.yaml, commit 0066e6bc19498cd4b17c6fa8737a68d543d5dcbc) has earlier
forms: dispatch_v2 without performance_info / y_dtype / x_dtype / scales_dtype and combine_v2 without
performance_info, which is why the backend passes none of those.

The emulation binds every call against these schemas (unknown keywords and wrong types raise, as the
real op does), and tests/test_ascend.py checks every keyword the backend passes against them.
"""

from __future__ import annotations

TORCH_NPU_VERSION = "2.14.0"

SCHEMAS: dict[str, str] = {
    "npu_moe_distribute_dispatch_v2": (
        "npu_moe_distribute_dispatch_v2(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, "
        "int ep_rank_id, int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, "
        "Tensor? expert_scales=None, Tensor? elastic_info=None, Tensor? performance_info=None, "
        'str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, '
        "int shared_expert_num=1, int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, "
        'int expert_token_nums_type=1, str comm_alg="", int zero_expert_num=0, int copy_expert_num=0, '
        "int const_expert_num=0, int? y_dtype=None, int? x_dtype=None, "
        "int? scales_dtype=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "npu_moe_distribute_combine_v2": (
        "npu_moe_distribute_combine_v2(Tensor expand_x, Tensor expert_ids, "
        "Tensor assist_info_for_combine, Tensor ep_send_counts, Tensor expert_scales, str group_ep, "
        "int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? tp_send_counts=None, "
        "Tensor? x_active_mask=None, Tensor? expand_scales=None, Tensor? shared_expert_x=None, "
        "Tensor? elastic_info=None, Tensor? ori_x=None, Tensor? const_expert_alpha_1=None, "
        "Tensor? const_expert_alpha_2=None, Tensor? const_expert_v=None, Tensor? performance_info=None, "
        'str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, '
        "int shared_expert_num=1, int shared_expert_rank_num=0, int global_bs=0, int comm_quant_mode=0, "
        'str comm_alg="", int zero_expert_num=0, int copy_expert_num=0, '
        "int const_expert_num=0) -> Tensor"
    ),
    "npu_moe_distribute_dispatch": (
        "npu_moe_distribute_dispatch(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, "
        "int ep_rank_id, int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, "
        'Tensor? expert_scales=None, str group_tp="", int tp_world_size=0, int tp_rank_id=0, '
        "int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, "
        "int quant_mode=0, int global_bs=0, int expert_token_nums_type=1) -> (Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor)"
    ),
    "npu_moe_distribute_combine": (
        "npu_moe_distribute_combine(Tensor expand_x, Tensor expert_ids, Tensor expand_idx, "
        "Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, "
        "int moe_expert_num, *, Tensor? tp_send_counts=None, Tensor? x_active_mask=None, "
        "Tensor? activation_scale=None, Tensor? weight_scale=None, Tensor? group_list=None, "
        'Tensor? expand_scales=None, Tensor? shared_expert_x=None, str group_tp="", int tp_world_size=0, '
        "int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
        "int shared_expert_rank_num=0, int global_bs=0, int out_dtype=0, int comm_quant_mode=0, "
        "int group_list_type=0) -> Tensor"
    ),
}
