"""Random ALFWorld scenes and their PDDL problems (the pure half of the game generator).

A scene is a room (kitchen, living room, bedroom, bathroom) with receptacles, objects placed in them
and one task. Everything is drawn from one `random.Random`, so a seed fixes the scene. The affordance
tables are alfworld's own (`alfworld.gen.constants`): which objects fit in which receptacles
(`VAL_RECEPTACLE_OBJECTS`), which are cleanable/heatable/coolable/sliceable (`VAL_ACTION_OBJECTS`),
which receptacles open (`OPENABLE_CLASS_SET`), which task fits which room (`GOALS_VALID`); the goal
formulas and task sentences are alfworld's `goal_library`. Each scene places a goal object in a
receptacle that can hold it and of another type than the goal receptacle, so the goal is reachable
and not already met (an unreachable goal makes the PDDL translator fail: KeyError 'val1').

Ids follow the ALFRED convention the demangler expects: `Apple_bar_02` shows as "apple N" (N follows
the sorted ids, not the suffix), a sink basin is `Sink_bar_01_bar_SinkBasin` ("sinkbasin 1").
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from importlib import resources

from alfworld.gen import constants as C
from alfworld.gen import goal_library

ROOMS = ("Kitchen", "LivingRoom", "Bedroom", "Bathroom")
# Receptacle types per room: (min, max) instances. Types with min > 0 are the room's core (added first);
# the rest fill up to the drawn count, weighted by remaining capacity. Ranges follow the real valid sets.
ROOM_RECEPTACLES: dict[str, dict[str, tuple[int, int]]] = {
    "Kitchen": {
        "CounterTop": (1, 3), "Fridge": (1, 1), "Microwave": (1, 1), "SinkBasin": (1, 1),
        "StoveBurner": (2, 4), "Cabinet": (2, 10), "Drawer": (1, 8), "CoffeeMachine": (1, 1),
        "Toaster": (1, 1), "GarbageCan": (1, 1), "DiningTable": (0, 2), "Shelf": (0, 3), "SideTable": (0, 1),
    },
    "LivingRoom": {
        "Sofa": (1, 1), "ArmChair": (1, 2), "CoffeeTable": (1, 2), "GarbageCan": (1, 1), "SideTable": (0, 3),
        "Drawer": (0, 6), "DiningTable": (0, 1), "TVStand": (0, 1), "Shelf": (0, 6), "Dresser": (0, 1),
        "Ottoman": (0, 1), "Cabinet": (0, 4), "Safe": (0, 1),
    },
    "Bedroom": {
        "Bed": (1, 1), "Drawer": (1, 8), "GarbageCan": (1, 1), "Desk": (0, 1), "SideTable": (0, 2),
        "Shelf": (0, 6), "Dresser": (0, 1), "LaundryHamper": (0, 1), "ArmChair": (0, 1), "Safe": (0, 1),
        "Cabinet": (0, 2),
    },
    "Bathroom": {
        "Toilet": (1, 1), "SinkBasin": (1, 2), "TowelHolder": (1, 1), "HandTowelHolder": (1, 1),
        "ToiletPaperHanger": (1, 1), "GarbageCan": (1, 1), "CounterTop": (0, 1), "BathtubBasin": (0, 1),
        "Drawer": (0, 6), "Cabinet": (0, 6), "Shelf": (0, 3), "Cart": (0, 1), "Dresser": (0, 1),
    },
}
ROOM_SCENES = {"Kitchen": range(1, 31), "LivingRoom": range(201, 231), "Bedroom": range(301, 331),
               "Bathroom": range(401, 431)}
# The appliance a task needs; it is never the goal receptacle (the real sets never put it there).
APPLIANCE = {"pick_clean_then_place_in_recep": "SinkBasin", "pick_heat_then_place_in_recep": "Microwave",
             "pick_cool_then_place_in_recep": "Fridge"}
ACTION_CLASS = {"pick_clean_then_place_in_recep": "Cleanable", "pick_heat_then_place_in_recep": "Heatable",
                "pick_cool_then_place_in_recep": "Coolable"}
LAMP = "DeskLamp"  # floor lamps stand in no receptacle, so a FloorLamp goal would be unreachable
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")
# Types the domain's actions name as constants: a problem that does not declare them fails to load.
DOMAIN_RTYPES = ("SinkBasin", "Microwave", "Fridge")
DOMAIN_OTYPES = ("Knife", "ButterKnife")
FIT = {r: {o for o in objs if not o.endswith("Sliced")} for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
PICKUPABLE = sorted(set().union(*FIT.values()))
BASIN_PARENT = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}


@dataclass
class Scene:
    """One sampled game world. Receptacles and objects are (id, type) / (id, type, receptacle id)."""

    task_type: str
    room: str
    scene_num: int
    object_target: str
    parent_target: str  # "" for look_at_obj_in_light
    toggle_target: str  # "DeskLamp" for look_at_obj_in_light, else ""
    receptacles: list[tuple[str, str]]
    objects: list[tuple[str, str, str]]
    opened: list[str] = field(default_factory=list)
    num_distractors: int = 0

    def pddl_params(self) -> dict:
        return {"mrecep_target": "", "object_sliced": False, "object_target": self.object_target,
                "parent_target": self.parent_target, "toggle_target": self.toggle_target}

    def task_only(self) -> Scene:
        """The same scene without distractors: what the planner needs (ALFRED's generator also plans on
        task objects only). Display numbers are per name, so the plan's names hold in the full scene."""
        keep = [o for o in self.objects if o[1] in (self.object_target, self.toggle_target)]
        return replace(self, objects=keep, num_distractors=0)

    def num_closed(self) -> int:
        return sum(1 for _, t in self.receptacles if t in C.OPENABLE_CLASS_SET) - len(self.opened)

    def dir_name(self) -> str:
        recep = self.parent_target or self.toggle_target
        return f"{self.task_type}-{self.object_target}-None-{recep}-{self.scene_num}"


def _floor_plan_objects(scene_num: int) -> set[str]:
    """Object types of a real ALFRED floor plan (alfworld ships the lists), {} if missing."""
    try:
        path = resources.files("alfworld.gen").joinpath(f"layouts/FloorPlan{scene_num}-objects.json")
        text = path.read_text()
    except (FileNotFoundError, OSError):
        return set()
    return set(json.loads(text))


def scene_numbers(room: str, split: str) -> list[int]:
    """Floor plans of a room: ALFRED's test scenes for valid_unseen, its train scenes otherwise."""
    pool = C.TEST_SCENE_NUMBERS if split == "valid_unseen" else C.TRAIN_SCENE_NUMBERS
    return [n for n in ROOM_SCENES[room] if n in pool]


def rooms_for(task_type: str) -> list[str]:
    return [r for r in ROOMS if r in C.GOALS_VALID[task_type]]


def task_sentences(task_type: str, params: dict) -> list[str]:
    """alfworld's templated task sentences (`get_templated_task_desc`, every template)."""
    return [t.format(obj=params["object_target"].lower(), recep=params["parent_target"].lower(),
                     toggle=params["toggle_target"].lower(), mrecep=params["mrecep_target"].lower())
            for t in goal_library.gdict[task_type]["templates"]]


def _choose_task(rng: random.Random, task_type: str, room: str, floor_objects: set[str]):
    """(object, parent or '', start receptacle type, extra required receptacle types), or None."""
    room_types = sorted(ROOM_RECEPTACLES[room])
    candidates = PICKUPABLE
    if task_type in ACTION_CLASS:
        candidates = [o for o in candidates if o in C.VAL_ACTION_OBJECTS[ACTION_CLASS[task_type]]]
    required = []
    if task_type in APPLIANCE:
        required.append(APPLIANCE[task_type])
    if task_type == "look_at_obj_in_light":
        holders = [t for t in LAMP_HOLDERS if t in room_types]
        if not holders:
            return None
        required.append(rng.choice(holders))
    options = []
    for obj in candidates:
        fits = [t for t in room_types if obj in FIT.get(t, ())]
        if task_type == "look_at_obj_in_light":
            parents = [""]
        else:
            parents = [t for t in fits if t not in required]
        for parent in parents:
            starts = [t for t in fits if t != parent]
            if starts:
                options.append((obj, parent, starts))
    if not options:
        return None
    local = [o for o in options if o[0] in floor_objects]  # prefer objects the real floor plan has
    obj, parent, starts = rng.choice(local or options)
    return obj, parent, rng.choice(starts), required + ([parent] if parent else [])


def _receptacle_counts(rng: random.Random, room: str, required: list[str], n: int) -> dict[str, int]:
    spec = ROOM_RECEPTACLES[room]
    counts = {t: 0 for t in spec}
    for t in required:
        counts[t] = max(counts[t], 1)
    n = max(n, sum(counts.values()))
    for t, (lo, _) in spec.items():  # core types, in the table's order, while there is room
        while counts[t] < lo and sum(counts.values()) < n:
            counts[t] += 1
    while sum(counts.values()) < n:
        free = [t for t, (_, hi) in spec.items() if counts[t] < hi]
        if not free:
            break
        t = rng.choices(free, weights=[spec[t][1] - counts[t] for t in free])[0]
        counts[t] += 1
    return {t: c for t, c in counts.items() if c > 0}


def _receptacle_id(rtype: str, k: int) -> str:
    if rtype in BASIN_PARENT:  # "Sink_bar_01_bar_SinkBasin" demangles to "sinkbasin"
        return f"{BASIN_PARENT[rtype]}_bar_{k:02d}_bar_{rtype}"
    return f"{rtype}_bar_{k:02d}"


def sample_scene(
    rng: random.Random,
    task_type: str,
    split: str = "train",
    min_receptacles: int = 6,
    max_receptacles: int = 25,
    num_distractors: tuple[int, int] = (2, 8),
    closed_fraction: float = 1.0,
) -> Scene:
    """Draw one solvable-by-construction scene for `task_type` (the planner confirms it later)."""
    for _ in range(100):
        room = rng.choice(rooms_for(task_type))
        scene_num = rng.choice(scene_numbers(room, split))
        floor_objects = _floor_plan_objects(scene_num)
        chosen = _choose_task(rng, task_type, room, floor_objects)
        if chosen is not None:
            break
    else:
        raise RuntimeError(f"no room fits task type {task_type}")
    obj, parent, start, required = chosen
    n = rng.randint(min_receptacles, max_receptacles)
    counts = _receptacle_counts(rng, room, required + [start], n)
    receptacles = [(_receptacle_id(t, k), t) for t in sorted(counts) for k in range(1, counts[t] + 1)]
    by_type: dict[str, list[str]] = {}
    for rid, t in receptacles:
        by_type.setdefault(t, []).append(rid)

    objects: list[tuple[str, str, str]] = []
    n_target = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 3)
    homes = [rid for rid, t in receptacles if obj in FIT.get(t, ()) and t != parent]
    places = [rng.choice(by_type[start])] + [rng.choice(homes) for _ in range(n_target - 1)]
    objects += [(f"{obj}_bar_{k + 1:02d}", obj, rid) for k, rid in enumerate(places)]
    if task_type == "look_at_obj_in_light":
        holder = next(t for t in required if t in LAMP_HOLDERS)
        objects.append((f"{LAMP}_bar_01", LAMP, rng.choice(by_type[holder])))

    # Distractors: other pickable types of the real floor plan (any pickable type if it has few).
    fits_here = {o for o in PICKUPABLE if any(o in FIT.get(t, ()) for t in counts)} - {obj}
    pool = sorted(fits_here & floor_objects) if len(fits_here & floor_objects) >= 3 else sorted(fits_here)
    n_dis = rng.randint(*num_distractors) if pool else 0
    per_type: dict[str, int] = {}
    for _ in range(n_dis):
        dtype = rng.choice(pool)
        per_type[dtype] = per_type.get(dtype, 0) + 1
        home = rng.choice([rid for rid, t in receptacles if dtype in FIT.get(t, ())])
        objects.append((f"{dtype}_bar_{per_type[dtype]:02d}", dtype, home))

    openable = [rid for rid, t in receptacles if t in C.OPENABLE_CLASS_SET]
    opened = sorted(r for r in openable if rng.random() >= closed_fraction)
    return Scene(task_type=task_type, room=room, scene_num=scene_num, object_target=obj,
                 parent_target=parent, toggle_target=LAMP if task_type == "look_at_obj_in_light" else "",
                 receptacles=receptacles, objects=sorted(objects), opened=opened, num_distractors=n_dis)


def goal_pddl(scene: Scene) -> str:
    """alfworld's goal formula for the task (goal_library, with its '#' type separator fixed)."""
    text = goal_library.gdict[scene.task_type]["pddl"].replace("#", "-")
    return text.format(obj=scene.object_target, recep=scene.parent_target, toggle=scene.toggle_target)


def scene_to_pddl(scene: Scene, problem_name: str) -> str:
    """The PDDL problem of a scene, laid out like ALFWorld's initial_state.pddl files."""
    receps = dict(scene.receptacles)
    loc = {rid: f"loc_bar_{i + 1:02d}" for i, (rid, _) in enumerate(scene.receptacles)}
    agent_loc = "loc_bar_00"  # "the middle of the room": no receptacle there
    otypes = sorted({t for _, t, _ in scene.objects} | set(DOMAIN_OTYPES))
    rtypes = sorted(set(receps.values()) | set(DOMAIN_RTYPES))
    objs = scene.objects
    action = C.VAL_ACTION_OBJECTS

    decl = ["agent1 - agent"]
    decl += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    decl += [f"{oid} - object" for oid, _, _ in objs]
    decl += [f"{rid} - receptacle" for rid, _ in scene.receptacles]
    decl += [f"{agent_loc} - location"] + [f"{loc[rid]} - location" for rid, _ in scene.receptacles]

    init = [f"(atLocation agent1 {agent_loc})"]
    init += [f"(receptacleType {rid} {t}Type)" for rid, t in scene.receptacles]
    init += [f"(receptacleAtLocation {rid} {loc[rid]})" for rid, _ in scene.receptacles]
    init += [f"(openable {rid})" for rid, t in scene.receptacles if t in C.OPENABLE_CLASS_SET]
    init += [f"(opened {rid})" for rid in scene.opened]
    init += [f"(canContain {rt}Type {ot}Type)" for rt in rtypes for ot in otypes if ot in FIT.get(rt, ())]
    for oid, t, rid in objs:
        init += [f"(objectType {oid} {t}Type)", f"(inReceptacle {oid} {rid})",
                 f"(objectAtLocation {oid} {loc[rid]})"]
        if t == LAMP:
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        if t in C.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {oid})")
        for cls, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                          ("Sliceable", "sliceable")):
            if t in action[cls]:
                init.append(f"({pred} {oid})")

    sep = "\n        "
    return (f"\n(define (problem plan_{problem_name})\n(:domain alfred)\n(:objects\n"
            f"{sep.join(decl)}\n        )\n\n(:init\n        {sep.join(init)}\n        )\n\n"
            f"{goal_pddl(scene)}")
