"""The ``sweep:`` section and search spaces: defaults, syntax, bad input, Optuna, overrides."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from conftest import tiny_config, write_config
from test_learners import METHOD_SECTIONS

from learners import LEARNERS, ConfigError
from orchestrator.config import load_config, method_specs
from sweeps import (
    OBJECTIVES,
    Dimension,
    default_space,
    grid_values,
    load_sweep_config,
    parse_space,
    suggest,
    sweep_spaces,
    to_overrides,
    tuned_labels,
)

LR = Dimension("train.lr", "log", 1e-4, 0.5)
METHODS = {"finetune": {}, "replay": {"buffer_size": 50}, "ewc": {}}


def sweep_config(tmp_path, **sweep) -> dict:
    """The tiny config with an ewc label too and the given ``sweep`` section."""
    return tiny_config(tmp_path, methods=dict(METHODS), sweep=sweep)


def test_default_spaces_come_from_hp_search_metadata():
    assert default_space("ewc") == {
        "ewc_lambda": Dimension("ewc_lambda", "log", 1e-1, 1e5),
        "train.lr": LR,
    }
    assert default_space("replay") == {
        "buffer_size": Dimension("buffer_size", "int_log", 50, 5000),
        "train.lr": LR,
    }
    assert default_space("finetune") == {"train.lr": LR}


def test_empty_space_is_each_labels_default_and_every_label_is_tuned(tmp_path):
    config = load_sweep_config(sweep_config(tmp_path))
    assert config.sweep.objective == ["ACC"] and config.sweep.n_trials == 20
    assert tuned_labels(config) == ["finetune", "replay", "ewc"]
    assert sweep_spaces(config) == {
        "finetune": default_space("finetune"),
        "replay": default_space("replay"),
        "ewc": default_space("ewc"),
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # [low, high]: a range of the field's type, log-scaled as the field declares
        ({"ewc_lambda": [1, 1000]}, Dimension("ewc_lambda", "log", 1.0, 1000.0)),
        ({"buffer_size": [10, 200]}, Dimension("buffer_size", "int_log", 10, 200)),
        ({"replay_batch_size": [0, 64]}, Dimension("replay_batch_size", "int", 0, 64)),
        ({"train.momentum": [0, 0.9]}, Dimension("train.momentum", "float", 0.0, 0.9)),
        # any other list: categorical choices
        (
            {"train.optimizer": ["sgd", "adam"]},
            Dimension("train.optimizer", "categorical", choices=("sgd", "adam")),
        ),
        (
            {"train.reset_optimizer": [True, False]},
            Dimension("train.reset_optimizer", "categorical", choices=(True, False)),
        ),
        (
            {"ewc_lambda": [1, 10, 100]},
            Dimension("ewc_lambda", "categorical", choices=(1.0, 10.0, 100.0)),
        ),
        ({"train.epochs": [2]}, Dimension("train.epochs", "categorical", choices=(2,))),
        # mappings
        (
            {"ewc_lambda": {"type": "float", "low": 1, "high": 5}},
            Dimension("ewc_lambda", "float", 1.0, 5.0),
        ),
        (
            {"train.lr": {"type": "log", "low": 1e-3, "high": 0.3}},
            Dimension("train.lr", "log", 1e-3, 0.3),
        ),
        (
            {"buffer_size": {"type": "int", "low": 10, "high": 20}},
            Dimension("buffer_size", "int", 10, 20),
        ),
        (
            {"replay_batch_size": {"type": "int_log", "low": 1, "high": 64}},
            Dimension("replay_batch_size", "int_log", 1, 64),
        ),
        ({"buffer_size": {"low": 10, "high": 20}}, Dimension("buffer_size", "int_log", 10, 20)),
        (
            {"model.dropout": {"choices": [0, 0.5]}},
            Dimension("model.dropout", "categorical", choices=(0.0, 0.5)),
        ),
        (
            {"fisher_type": {"type": "categorical", "choices": ["true"]}},
            Dimension("fisher_type", "categorical", choices=("true",)),
        ),
    ],
)
def test_space_syntax(spec, expected):
    method = "ewc" if set(spec) & {"ewc_lambda", "fisher_type"} else "replay"
    assert parse_space(spec, method, method) == {expected.key: expected}


# Every bad sweep section: the section (with the tiny config plus an ewc label), and a phrase
# of the one expected message, which names the key.
BAD_SWEEPS = [
    # space keys the method lacks (the accepted keys are listed: hparams, train.*, model.*)
    (
        {"methods": ["replay"], "space": {"ewc_lambda": [1, 10]}},
        "sweep.space.ewc_lambda is not a searchable key of method replay (label replay); "
        "accepted keys: buffer_size, replay_batch_size, train.epochs",
    ),
    ({"methods": ["ewc"], "space": {"train.nope": [1, 2]}}, "sweep.space.train.nope is not a"),
    ({"methods": ["ewc"], "space": {"model.hidden": [[8], [16]]}}, "sweep.space.model.hidden"),
    (
        {"space": {"buffer_size": [10, 20]}},
        "sweep.space.buffer_size is not a searchable key of method finetune",
    ),
    # malformed specs
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": 5}},
        "sweep.space.ewc_lambda=5 is not accepted; expected {type: float|log",
    ),
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": {"type": "uniform", "low": 1, "high": 2}}},
        "sweep.space.ewc_lambda.type='uniform' is not accepted; "
        "expected one of float, log, int, int_log, categorical",
    ),
    (
        {
            "methods": ["ewc"],
            "space": {"ewc_lambda": {"type": "log", "low": 1, "high": 2, "step": 1}},
        },
        "unknown key sweep.space.ewc_lambda.step; accepted keys: type, low, high, choices",
    ),
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": {"type": "log", "low": 1}}},
        "sweep.space.ewc_lambda: type log takes low and high",
    ),
    (
        {"methods": ["ewc"], "space": {"fisher_type": {"type": "categorical", "low": 1}}},
        "sweep.space.fisher_type: a categorical takes choices, not low/high",
    ),
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": {"type": "log", "low": "a", "high": 2}}},
        "sweep.space.ewc_lambda: bounds of type log must be numbers; got 'a'",
    ),
    # low > high, log with low <= 0, empty categorical
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": {"type": "log", "low": 100, "high": 1}}},
        "sweep.space.ewc_lambda: low=100 is greater than high=1",
    ),
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": [0, 10]}},
        "sweep.space.ewc_lambda: type log needs low > 0; got low=0",
    ),
    (
        {"methods": ["replay"], "space": {"buffer_size": {"type": "int_log", "low": 0, "high": 9}}},
        "sweep.space.buffer_size: type int_log needs low > 0",
    ),
    (
        {"methods": ["ewc"], "space": {"fisher_type": []}},
        "sweep.space.fisher_type: a categorical needs a non-empty list of choices",
    ),
    (
        {"methods": ["ewc"], "space": {"train.optimizer": {"type": "categorical", "choices": []}}},
        "sweep.space.train.optimizer: a categorical needs a non-empty list",
    ),
    # values outside the field's declared hp() range or choices
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": {"type": "float", "low": -1, "high": 10}}},
        "sweep.space.ewc_lambda: low -1 is not accepted by ewc_lambda; expected a value >= 0",
    ),
    (
        {"methods": ["ewc"], "space": {"train.momentum": [0.5, 1.5]}},
        "sweep.space.train.momentum: high 1.5 is not accepted by train.momentum; "
        "expected a value in [0, 1]",
    ),
    (
        {"methods": ["ewc"], "space": {"train.lr": {"type": "float", "low": 0, "high": 0.1}}},
        "sweep.space.train.lr: low 0 is not accepted by train.lr; expected a value > 0",
    ),
    (
        {"methods": ["ewc"], "space": {"train.optimizer": ["sgd", "rmsprop"]}},
        "sweep.space.train.optimizer: choice 'rmsprop' is not accepted by train.optimizer; "
        "expected one of 'sgd', 'adam'",
    ),
    (
        {"methods": ["ewc"], "space": {"model.dropout": [0.0, 0.5, 0.95]}},
        "sweep.space.model.dropout: choice 0.95 is not accepted by model.dropout; "
        "expected a value in [0, 0.9]",
    ),
    # types that do not fit the field
    (
        {"methods": ["replay"], "space": {"buffer_size": [10.5, 100.0]}},
        "sweep.space.buffer_size: bounds of type int_log must be integers; got 10.5",
    ),
    (
        {"methods": ["replay"], "space": {"buffer_size": {"type": "log", "low": 10, "high": 99}}},
        "sweep.space.buffer_size: buffer_size is an integer; use type int or int_log",
    ),
    (
        {"methods": ["ewc"], "space": {"ewc_lambda": {"type": "int", "low": 1, "high": 9}}},
        "sweep.space.ewc_lambda: ewc_lambda is a float; use type float or log",
    ),
    (
        {"methods": ["replay"], "space": {"buffer_size": [10, 20.5, 30]}},
        "sweep.space.buffer_size: choice 20.5 is not accepted by buffer_size; expected an integer",
    ),
    (
        {"methods": ["ewc"], "space": {"train.optimizer": [1, 2]}},
        "sweep.space.train.optimizer: train.optimizer is not a number",
    ),
    (
        {"methods": ["ewc"], "space": {"fisher_type": [True, "true"]}},
        "sweep.space.fisher_type: choice True is not accepted by fisher_type; "
        "expected a non-empty string",
    ),
    # the grid sampler: categorical or small int dimensions only
    (
        {"methods": ["ewc"], "sampler": "grid"},
        "grid needs categorical or int dimensions; "
        "give sweep.space.ewc_lambda as {type: categorical, choices: [...]}",
    ),
    (
        {"methods": ["replay"], "sampler": "grid", "space": {"buffer_size": [1, 100]}},
        "sweep.space.buffer_size: the grid sampler takes int ranges of at most 20 values, "
        "this one has 100",
    ),
    # the other keys of the section
    ({"n_trial": 5}, "unknown key sweep.n_trial; accepted keys in sweep: methods, n_trials, space"),
    ({"space": "x"}, "sweep.space must be a mapping"),
    ({"n_trials": 0}, "sweep.n_trials=0 is out of range; expected a value >= 1"),
    (
        {"methods": ["nope"]},
        "sweep.methods: 'nope' is not a label of methods; accepted labels: finetune, replay, ewc",
    ),
    ({"methods": ["ewc", "ewc"]}, "sweep.methods=['ewc', 'ewc'] has duplicates"),
    (
        {"objective": ["accuracy"]},
        "sweep.objective: unknown objective 'accuracy'; accepted: ACC, BWT, FWT, forgetting",
    ),
    (
        {"objective": []},
        "sweep.objective=[] is not accepted; expected one or two different objectives",
    ),
    (
        {"objective": ["ACC", "BWT", "forgetting"]},
        "sweep.objective=['ACC', 'BWT', 'forgetting'] is not accepted; expected one or two",
    ),
    ({"objective": ["ACC", "ACC"]}, "sweep.objective=['ACC', 'ACC'] is not accepted"),
    (
        {"sampler": "bayes"},
        "sweep.sampler='bayes' is not accepted; expected one of 'tpe', 'random', 'grid', 'cmaes'",
    ),
    (
        {"pruner": "asha"},
        "sweep.pruner='asha' is not accepted; "
        "expected one of 'median', 'percentile', 'successive_halving', 'hyperband', "
        "'wilcoxon', 'none'",
    ),
    (
        {"protocol": "test"},
        "sweep.protocol='test' is not accepted; expected one of 'full', 'heldout', 'first_tasks'",
    ),
    (
        {"protocol": "first_tasks", "first_tasks": 3},
        "sweep.first_tasks=3 must be less than stream.num_tasks=3 for protocol first_tasks",
    ),
    ({"first_tasks": 0}, "sweep.first_tasks=0 is out of range; expected a value >= 1"),
    (
        {"seeds_per_trial": 3},
        "sweep.seeds_per_trial=3 needs as many seeds in seeds; seeds=[0, 1] has 2",
    ),
    ({"seeds_per_trial": 0}, "sweep.seeds_per_trial=0 is out of range; expected a value >= 1"),
    ({"study_name": " "}, "sweep.study_name is empty"),
]


@pytest.mark.parametrize(("sweep", "phrase"), BAD_SWEEPS)
def test_bad_sweep_section_is_refused_naming_the_key(tmp_path, sweep, phrase):
    with pytest.raises(ConfigError) as info:
        load_sweep_config(sweep_config(tmp_path, **sweep))
    assert phrase in str(info.value)


def test_grid_values():
    space = parse_space(
        {"train.optimizer": ["sgd", "adam"], "replay_batch_size": [0, 3]}, "replay", "r"
    )
    assert grid_values(space) == {
        "train.optimizer": ["sgd", "adam"],
        "replay_batch_size": [0, 1, 2, 3],
    }


MIXED_SPACE = {
    "ewc_lambda": {"type": "log", "low": 0.1, "high": 1e4},
    "fisher_samples": {"type": "int", "low": 0, "high": 64},
    "fisher_type": ["empirical", "true"],
    "train.lr": {"type": "log", "low": 1e-4, "high": 0.5},
    "train.batch_size": {"type": "int_log", "low": 1, "high": 256},
    "train.momentum": [0.0, 0.9],
    "train.reset_optimizer": [True, False],
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


def suggested(space: dict[str, Dimension], n: int) -> list[dict]:
    """Parameters of ``n`` trials of an in-memory TPE study with a fixed seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    params = []
    for _ in range(n):
        trial = study.ask()
        params.append(suggest(trial, space))
        assert trial.params == params[-1]
        for key, dim in space.items():
            log = getattr(trial.distributions[key], "log", False)
            assert log == (dim.kind in ("log", "int_log")), key
        study.tell(trial, 0.0)
    return params


def test_suggest_gives_values_inside_the_space_with_the_right_types():
    space = parse_space(MIXED_SPACE, "ewc", "ewc")
    for params in suggested(space, 12):
        assert list(params) == list(space)
        for key, value in params.items():
            dim = space[key]
            if dim.kind == "categorical":
                assert value in dim.choices and type(value) is type(dim.choices[0])
            else:
                assert dim.low <= value <= dim.high
                expected = int if dim.kind in ("int", "int_log") else float
                assert type(value) is expected, (key, value)


def test_overrides_round_trip_through_load_config_exactly(tmp_path):
    space = parse_space(MIXED_SPACE, "ewc", "tuned")
    config = tiny_config(tmp_path, methods={"tuned": {"method": "ewc", "ewc_lambda": 5.0}})
    trials = suggested(space, 8) + [
        {"ewc_lambda": 0.1 + 0.2, "train.lr": 1e-05, "fisher_type": "true", "model.dropout": 0.3}
    ]
    for params in trials:
        loaded = load_config(config, to_overrides("tuned", params))
        resolved = {
            **method_specs(loaded)[0].hparams,
            **{f"train.{k}": v for k, v in vars(loaded.train).items()},
            **{f"model.{k}": v for k, v in vars(loaded.model).items()},
        }
        for key, value in params.items():
            assert resolved[key] == value and type(resolved[key]) is type(value), key


def test_to_overrides_format():
    params = {"ewc_lambda": 0.1, "fisher_type": "true", "buffer_size": 64, "train.lr": 1e-05}
    params |= {"train.reset_optimizer": False, "train.optimizer": "adam"}
    assert to_overrides("ewc_strong", params) == [
        "methods.ewc_strong.ewc_lambda=0.1",
        'methods.ewc_strong.fisher_type="true"',
        "methods.ewc_strong.buffer_size=64",
        "train.lr=1e-05",
        "train.reset_optimizer=false",
        "train.optimizer=adam",
    ]


def test_load_sweep_config_from_yaml_with_overrides(tmp_path):
    config = sweep_config(
        tmp_path,
        methods=["replay"],
        n_trials=8,
        objective=["ACC", "stored_bytes"],
        pruner="none",
        space={"buffer_size": [20, 400], "train.optimizer": ["sgd", "adam"]},
    )
    path = write_config(tmp_path, config)
    loaded = load_sweep_config(path, ["sweep.space.train.lr=[0.01,0.2]", "sweep.n_trials=4"])
    assert loaded.sweep.n_trials == 4 and loaded.sweep.objective == ["ACC", "stored_bytes"]
    assert {OBJECTIVES[name] for name in loaded.sweep.objective} == {"maximize", "minimize"}
    assert sweep_spaces(loaded) == {
        "replay": {
            "buffer_size": Dimension("buffer_size", "int_log", 20, 400),
            "train.optimizer": Dimension("train.optimizer", "categorical", choices=("sgd", "adam")),
            "train.lr": Dimension("train.lr", "log", 0.01, 0.2),
        }
    }
    config["sweep"]["n_trails"] = 3
    with pytest.raises(ConfigError, match="unknown key sweep.n_trails; accepted keys in sweep"):
        load_sweep_config(write_config(tmp_path, config))


def test_an_override_replaces_a_mapping_spec_with_a_list_and_back(tmp_path):
    config = sweep_config(
        tmp_path,
        methods=["ewc"],
        space={"ewc_lambda": {"type": "log", "low": 1.0, "high": 100.0}, "train.lr": [0.01, 0.1]},
    )
    path = write_config(tmp_path, config)
    loaded = load_sweep_config(
        path,
        [
            "sweep.space.ewc_lambda=[5,50]",
            "sweep.space.train.lr={type: categorical, choices: [0.1]}",
        ],
    )
    assert sweep_spaces(loaded)["ewc"] == {
        "ewc_lambda": Dimension("ewc_lambda", "log", 5.0, 50.0),
        "train.lr": Dimension("train.lr", "categorical", choices=(0.1,)),
    }
    with pytest.raises(ConfigError, match="seeds must be a list of integers"):
        load_sweep_config(path, ["seeds={a: 1}"])  # where the schema says list, still refused
    with pytest.raises(ConfigError, match="a space after each colon"):
        load_sweep_config(path, ["sweep.space.ewc_lambda={type:categorical,choices:[1,10]}"])


@pytest.mark.parametrize(
    "name",
    sorted(n for n, cls in LEARNERS.items() if cls.__module__.startswith("learners.")),
)
def test_every_method_is_tunable_with_no_sweep_code(name, tmp_path):
    """Each method declares a search range for its own hyperparameters (hp(search=...)), and
    values sampled from its default space make a config lia run accepts."""
    space = default_space(name)
    own = {f.name for f in dataclasses.fields(LEARNERS[name].HParams)}
    assert set(space) - {"train.lr"} or not own, f"{name} declares no search range"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    scenarios = LEARNERS[name].SCENARIOS
    scenario = "class" if "class" in scenarios else scenarios[0]  # progressive, packnet: task
    stream = {"name": "split", "source": "digits", "num_tasks": 2, "scenario": scenario}
    for _ in range(3):
        params = suggest(study.ask(), space)
        config = tiny_config(tmp_path, methods={name: {}}, seeds=[0], stream=stream,
                             **METHOD_SECTIONS.get(name, {}))  # fmt: skip
        loaded = load_config(config, to_overrides(name, params))
        (spec,) = method_specs(loaded)
        for key, value in params.items():
            if "." not in key:
                assert spec.hparams[key] == value


def test_first_tasks_of_a_domains_stream_keeps_its_first_domains(tmp_path):
    from sweeps.driver import trial_config

    config = sweep_config(tmp_path, protocol="first_tasks", first_tasks=2)
    config["stream"] = {"name": "domains", "domains": ["digits", "digits:rot90", "digits:perm"],
                        "train_per_task": 50, "test_per_task": 20}  # fmt: skip
    loaded = load_sweep_config(config)
    label = next(iter(loaded.methods))
    trial = trial_config(loaded, label, {})
    assert trial.stream.domains == ["digits", "digits:rot90"] and trial.stream.num_tasks == 2


def test_a_label_s_own_space_joins_the_shared_keys_and_wins_over_them(tmp_path):
    config = sweep_config(
        tmp_path,
        space={
            "train.lr": [0.001, 0.01],  # shared by every tuned label
            "ewc": {"ewc_lambda": [1.0, 1000.0], "train": {"lr": [0.01, 0.1]}},
            "replay": {"buffer_size": [20, 400]},
        },
    )
    path = write_config(tmp_path, config)
    assert sweep_spaces(load_sweep_config(path)) == {
        "finetune": {"train.lr": Dimension("train.lr", "log", 0.001, 0.01)},
        "replay": {
            "train.lr": Dimension("train.lr", "log", 0.001, 0.01),
            "buffer_size": Dimension("buffer_size", "int_log", 20, 400),
        },
        "ewc": {
            "train.lr": Dimension("train.lr", "log", 0.01, 0.1),  # its own bound wins
            "ewc_lambda": Dimension("ewc_lambda", "log", 1.0, 1000.0),
        },
    }
    # an override reaches into a label's section; a label without shared keys or a section of
    # its own keeps its method's default space
    loaded = load_sweep_config(
        write_config(
            tmp_path, sweep_config(tmp_path, space={"ewc": {"ewc_lambda": {"low": 1, "high": 10}}})
        ),
        ["sweep.space.ewc.ewc_lambda.high=50"],
    )
    spaces = sweep_spaces(loaded)
    assert spaces["ewc"] == {"ewc_lambda": Dimension("ewc_lambda", "log", 1.0, 50.0)}
    assert spaces["replay"] == default_space("replay")


def test_a_bad_key_in_a_label_s_space_is_named_with_its_label(tmp_path):
    bad = sweep_config(tmp_path, methods=["finetune"], space={"ewc": {"buffer_size": [20, 400]}})
    with pytest.raises(ConfigError, match=r"sweep\.space\.ewc\.buffer_size is not a searchable "
                       r"key of method ewc"):  # fmt: skip
        load_sweep_config(write_config(tmp_path, bad))  # checked though ewc is not tuned
    bad = sweep_config(tmp_path, space={"ewc": {"ewc_lambda": {"low": 5, "high": 1}}})
    with pytest.raises(ConfigError, match=r"sweep\.space\.ewc\.ewc_lambda: low=5"):
        load_sweep_config(write_config(tmp_path, bad))
    bad = sweep_config(tmp_path, space={"ewc": [1, 10]})
    with pytest.raises(ConfigError, match="'ewc' is a method label, so its entry is"):
        load_sweep_config(write_config(tmp_path, bad))


def test_an_override_into_a_list_spec_is_refused_naming_the_list(tmp_path):
    path = write_config(tmp_path, sweep_config(tmp_path, space={"ewc": {"ewc_lambda": [1, 10]}}))
    with pytest.raises(ConfigError, match=r"sweep\.space\.ewc\.ewc_lambda is a list \(\[1,10\]\), "
                       r"which has no key 'high'; set it whole"):  # fmt: skip
        load_sweep_config(path, ["sweep.space.ewc.ewc_lambda.high=50"])
