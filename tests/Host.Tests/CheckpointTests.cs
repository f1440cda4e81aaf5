using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using Akka.Configuration;
using Xunit;

namespace ActorVmm.Host.Tests;

public sealed class CheckpointTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static VmConfig Parse(string hocon) =>
        VmConfig.From(ConfigurationFactory.ParseString(hocon).WithFallback(VmConfig.Load(null)));

    [Fact]
    public void Checkpoints_are_off_by_default_and_need_an_absolute_directory_when_on()
    {
        Assert.Null(Parse("").Checkpoint);
        var spec = Parse("actorvmm.vm.checkpoint { interval = 5s, directory = \"/shared/ckpt\" }").Checkpoint!;
        Assert.Equal((TimeSpan.FromSeconds(5), "/shared/ckpt"), (spec.Interval, spec.Directory));
        Assert.Contains("absolute path", Assert.Throws<ConfigException>(() => Parse("actorvmm.vm.checkpoint.interval = 5s")).Message);
        Assert.Contains("absolute path", Assert.Throws<ConfigException>(() =>
            Parse("actorvmm.vm.checkpoint { interval = 5s, directory = relative/dir }")).Message);
        Assert.Contains("checkpoint.interval", Assert.Throws<ConfigException>(() =>
            Parse("actorvmm.vm.checkpoint { interval = often, directory = /x }")).Message);
    }

    [Fact]
    public void Only_checkpoints_whose_manifest_was_written_count_newest_first()
    {
        var vm = CheckpointProtocol.VmDirectory(_dir.File("root"), "vm");
        Assert.Empty(CheckpointProtocol.Complete(vm)); // no directory yet
        VmRestoreTests.Write(VmRestoreTests.Good(), Path.Combine(vm, "checkpoint-000002"), 1 << 20);
        VmRestoreTests.Write(VmRestoreTests.Good(), Path.Combine(vm, "checkpoint-000010"), 1 << 20);
        // Cut short (its node died while writing it): parts, no manifest.
        Directory.CreateDirectory(Path.Combine(vm, "checkpoint-000011"));
        File.WriteAllText(Path.Combine(vm, "checkpoint-000011", "memory.part"), "half");
        Directory.CreateDirectory(Path.Combine(vm, "checkpoint-x"));
        Directory.CreateDirectory(Path.Combine(vm, "other"));

        Assert.Equal([10L, 2L], CheckpointProtocol.Complete(vm).Select(c => c.Sequence));
        Assert.EndsWith("checkpoint-000010", CheckpointProtocol.Complete(vm)[0].Path);
    }
}
