using System.Text;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Control;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// A migration's target side between two host nodes of one cluster in this process
/// (<see cref="MigrationProtocol"/>): a snapshot offered by a probe on one node streams through a
/// StreamRef into the other node, which checks it and says Ready; bad offers and bad chunks are
/// refused; what was received is removed when the migration is given up. A real VM moving between
/// two `actorvmm host` processes is in the Integration tests.
/// </summary>
public sealed class MigrationTests : IAsyncLifetime
{
    private readonly InProcessCluster _cluster = new();
    private readonly TempDir _dir = new();

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync()
    {
        await _cluster.DisposeAsync();
        _dir.Dispose();
    }

    private static ActorSelection NodeActor(ActorSystem from, ActorSystem node) =>
        from.ActorSelection(new RootActorPath(Akka.Cluster.Cluster.Get(node).SelfAddress) / "user" / ControlProtocol.DirectoryName);

    private static string[] Incoming(string vm) =>
        Directory.GetDirectories(Path.GetTempPath(), $"actorvmm-incoming-{vm}-*");

    /// <summary>A well-formed snapshot whose 4 MiB of guest memory is holes but for a few written pieces.</summary>
    private string Snapshot()
    {
        return VmRestoreTests.Write(VmRestoreTests.Good(cpus: 2), _dir.File("snap"), 4 << 20, memory =>
        {
            foreach (var at in new long[] { 0, 65_535, 1 << 20, (4 << 20) - 3 })
            {
                memory.Position = at;
                memory.Write(Encoding.ASCII.GetBytes($"piece@{at}"[..3]));
            }
        });
    }

    internal static ConsoleProtocol.State Console(string text) => new(text.Length, Encoding.ASCII.GetBytes(text));

    [Fact]
    public async Task An_offered_snapshot_streams_to_the_other_node_intact_and_is_removed_there_when_the_migration_is_given_up()
    {
        var (source, target) = await _cluster.TwoNodes();
        var snapshot = Snapshot();
        var files = MigrationProtocol.FilesOf(snapshot);
        Assert.Equal(ActorVmm.Host.Snapshot.SnapshotDirectory.ManifestFile, files[^1].Name); // the manifest goes last
        var probe = new TestProbe(source, new XunitAssertions());
        NodeActor(source, target).Tell(new MigrationProtocol.Offer("moving", [new("actorvmm.vm.memory", "4M")], files, Console("so far\n")), probe.Ref);
        await probe.ExpectMsgAsync<MigrationProtocol.Accepted>(TimeSpan.FromSeconds(30));
        var receiver = probe.LastSender;

        // The chunks, without the all-zero ones (most of the memory), through a StreamRef.
        var chunks = MigrationProtocol.Chunks(snapshot, files).ToList();
        Assert.True(chunks.Count < files.Sum(f => (f.Length + MigrationProtocol.ChunkBytes - 1) / MigrationProtocol.ChunkBytes) - 50);
        Assert.All(chunks, c => Assert.InRange(c.Bytes.Length, 1, MigrationProtocol.ChunkBytes));
        var streamRef = await Source.From(chunks).RunWith(StreamRefs.SourceRef<MigrationProtocol.Chunk>(), source.Materializer());
        receiver.Tell(streamRef, probe.Ref);
        await probe.ExpectMsgAsync<MigrationProtocol.Ready>(TimeSpan.FromSeconds(30));

        // What arrived is the snapshot, byte for byte, holes included.
        var arrived = Assert.Single(Incoming("moving"));
        foreach (var f in files)
            Assert.True(File.ReadAllBytes(Path.Combine(snapshot, f.Name)).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(arrived, f.Name))),
                $"{f.Name} differs after the transfer");

        // Given up before the commit: the target drops what it received.
        receiver.Tell(new MigrationProtocol.Abort("moving", "the test gives it up"), probe.Ref);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (Directory.Exists(arrived))
        {
            Assert.True(DateTime.UtcNow < deadline, $"{arrived} is still there after the abort");
            await Task.Delay(50);
        }
    }

    [Fact]
    public async Task Offers_that_name_files_outside_the_snapshot_or_are_not_a_snapshot_and_chunks_outside_the_files_are_refused()
    {
        var (source, target) = await _cluster.TwoNodes();
        var probe = new TestProbe(source, new XunitAssertions());
        var node = NodeActor(source, target);
        MigrationProtocol.OfferedFile Manifest() => new("manifest.json", 10);

        async Task<string> Refusal(MigrationProtocol.Offer offer)
        {
            node.Tell(offer, probe.Ref);
            return (await probe.ExpectMsgAsync<MigrationProtocol.Refused>(TimeSpan.FromSeconds(30))).Why;
        }
        Assert.Contains("not a file name", await Refusal(new("bad", [], [new("../../etc/passwd", 10), Manifest()], Console(""))));
        Assert.Contains("offered twice", await Refusal(new("bad", [], [Manifest(), Manifest()], Console(""))));
        Assert.Contains("no manifest.json", await Refusal(new("bad", [], [new("spec.part", 10)], Console(""))));
        Assert.Contains("not VM settings", await Refusal(new("bad", [new("akka.actor.provider", "local")], [Manifest()], Console(""))));
        Assert.Contains("cannot name a VM", await Refusal(new("../up", [], [Manifest()], Console(""))));
        Assert.Contains("console", await Refusal(new("bad", [], [Manifest()], new ConsoleProtocol.State(1, new byte[5]))));

        // Files that are not a snapshot: refused once received, with what is wrong with them.
        node.Tell(new MigrationProtocol.Offer("junk", [], [new("manifest.json", 5)], Console("")), probe.Ref);
        await probe.ExpectMsgAsync<MigrationProtocol.Accepted>(TimeSpan.FromSeconds(30));
        var junk = probe.LastSender;
        junk.Tell(await Source.Single(new MigrationProtocol.Chunk(0, 0, "{{{{{"u8.ToArray()))
            .RunWith(StreamRefs.SourceRef<MigrationProtocol.Chunk>(), source.Materializer()), probe.Ref);
        Assert.Contains("not usable", (await probe.ExpectMsgAsync<MigrationProtocol.Refused>(TimeSpan.FromSeconds(30))).Why);

        // A chunk past its file's end fails the transfer; nothing is left behind.
        node.Tell(new MigrationProtocol.Offer("overrun", [], [new("manifest.json", 5)], Console("")), probe.Ref);
        await probe.ExpectMsgAsync<MigrationProtocol.Accepted>(TimeSpan.FromSeconds(30));
        var overrun = probe.LastSender;
        overrun.Tell(await Source.Single(new MigrationProtocol.Chunk(0, 3, new byte[3]))
            .RunWith(StreamRefs.SourceRef<MigrationProtocol.Chunk>(), source.Materializer()), probe.Ref);
        Assert.Contains("transfer failed", (await probe.ExpectMsgAsync<MigrationProtocol.Refused>(TimeSpan.FromSeconds(30))).Why);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (Incoming("overrun").Length + Incoming("junk").Length > 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "a refused migration's files are still there");
            await Task.Delay(50);
        }
    }

    /// <summary>The source's side with probes for the VM, its console hub, its node actor (the migration's
    /// parent) and ctl, migrating to <paramref name="target"/>.</summary>
    private sealed class SourceSide(ActorSystem source, ActorSystem target)
    {
        public readonly TestProbe Vm = new(source, new XunitAssertions());
        public readonly TestProbe Console = new(source, new XunitAssertions());
        public readonly TestProbe Node = new(source, new XunitAssertions());
        public readonly TestProbe Ctl = new(source, new XunitAssertions());
        public readonly string SourceNode = NodeProtocol.NodeName(Akka.Cluster.Cluster.Get(source).SelfAddress);
        public readonly string TargetNode = NodeProtocol.NodeName(Akka.Cluster.Cluster.Get(target).SelfAddress);
        public IActorRef Migration = ActorRefs.Nobody;

        public void Start(string vm, bool reportProgress = false, bool stopAndCopy = true, TimeSpan? maxDowntime = null) =>
            Migration = Node.ChildActorOf(MigrationSource.Props(new MigrationSource.Job(vm, Vm.Ref, Console.Ref, () => { }, [],
                Akka.Cluster.Cluster.Get(target).SelfAddress, TargetNode, SourceNode, Ctl.Ref, reportProgress, maxDowntime, stopAndCopy)));

        /// <summary>What ctl is told in the end, and the steps it was told of before.</summary>
        public async Task<(MigrationProtocol.MigrationFailed Failed, List<string> Steps)> Outcome()
        {
            var steps = new List<string>();
            while (true)
                switch (await Ctl.ExpectMsgAsync<object>(TimeSpan.FromSeconds(60)))
                {
                    case MigrationProtocol.Progress p:
                        if (!steps.Contains(p.Step)) steps.Add(p.Step);
                        continue;
                    case MigrationProtocol.MigrationFailed f:
                        return (f, steps);
                    case var other:
                        Assert.Fail($"ctl was told {other}");
                        break;
                }
        }

        /// <summary>The VM's part of the snapshot: paused, then a snapshot written where asked.</summary>
        public async Task<string> Snapshot(Action<string> write)
        {
            await Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.Pause>(TimeSpan.FromSeconds(30));
            var take = await Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.TakeSnapshot>(TimeSpan.FromSeconds(30));
            write(take.Directory);
            return take.Directory;
        }

        /// <summary>The snapshot is taken; the console hub answers the state the migration asks for (with
        /// <paramref name="asked"/> false, it is told it at once: the migration may have given up already).</summary>
        public async Task Snapshotted(string directory, bool asked = true)
        {
            Migration.Tell(new ActorVmm.Host.Vm.VmProtocol.SnapshotTaken("vm", directory, 1, 4096, TimeSpan.Zero, TimeSpan.Zero, false), Vm.Ref);
            if (asked) await Console.ExpectMsgAsync<ConsoleProtocol.GetState>(TimeSpan.FromSeconds(30));
            Migration.Tell(MigrationTests.Console("so far\n"), Console.Ref);
        }
    }

    [Fact]
    public async Task A_target_node_that_goes_away_before_the_commit_leaves_the_vm_resumed_on_the_source()
    {
        var (source, target) = await _cluster.TwoNodes();
        var side = new SourceSide(source, target);
        side.Start("stays");
        var directory = await side.Snapshot(d => VmRestoreTests.Write(VmRestoreTests.Good(), d, 1 << 20));
        // The target's node leaves while the VM's snapshot is being taken: the migration resumes the VM
        // only after the snapshot's answer (which the snapshot may still need the paused VM for).
        var targetAddress = Akka.Cluster.Cluster.Get(target).SelfAddress;
        await target.Terminate();
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (Akka.Cluster.Cluster.Get(source).State.Members.Any(m => m.Address.Equals(targetAddress)))
        {
            Assert.True(DateTime.UtcNow < deadline, "the target's node was not removed");
            await Task.Delay(50);
        }
        await side.Vm.ExpectNoMsgAsync(TimeSpan.FromSeconds(1));
        await side.Snapshotted(directory, asked: false);

        await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.Resume>(TimeSpan.FromSeconds(60));
        // The VM keeps the report for `ctl stats`.
        Assert.StartsWith($"to {side.TargetNode} failed after", (await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.RecordMigration>()).Report);
        var failed = await side.Ctl.ExpectMsgAsync<MigrationProtocol.MigrationFailed>(TimeSpan.FromSeconds(30));
        Assert.Contains($"it goes on running on {side.SourceNode}", failed.Why);
        Assert.Equal(side.SourceNode, failed.RunsOn);
        // The source never ended the VM, and dropped its snapshot.
        side.Node.ExpectNoMsg(TimeSpan.FromMilliseconds(300));
        Assert.False(Directory.Exists(directory), $"{directory} is still there");
    }

    [Fact]
    public async Task A_vm_the_target_cannot_start_after_the_commit_is_started_again_on_the_source_from_its_snapshot()
    {
        var (source, target) = await _cluster.TwoNodes();
        var side = new SourceSide(source, target);
        side.Start("bounced", reportProgress: true);
        // A disk that is not there on the target: its start fails after the commit.
        var missing = _dir.File("no-such-disk.img");
        var parts = VmRestoreTests.Good() with { Spec = VmRestoreTests.Good().Spec with { Disk = new ActorVmm.Host.Vm.DiskSpec(missing) } };
        var directory = await side.Snapshot(d => VmRestoreTests.Write(parts, d, 1 << 20));
        await side.Snapshotted(directory);

        // Ready: the source ends its VM (the node actor's part) before it commits.
        var end = await side.Node.ExpectMsgAsync<MigrationSource.EndForMove>(TimeSpan.FromSeconds(60));
        Assert.Equal(("bounced", side.TargetNode), (end.Name, end.To));
        side.Migration.Tell(new MigrationSource.Released("bounced"));
        // The target fails to start it: the source starts it again from its own snapshot.
        var again = await side.Node.ExpectMsgAsync<MigrationSource.RestartHere>(TimeSpan.FromSeconds(60));
        Assert.Equal(directory, again.Directory);
        Assert.True(File.Exists(Path.Combine(directory, ActorVmm.Host.Snapshot.SnapshotDirectory.ManifestFile)));
        side.Migration.Tell(new MigrationSource.RestartedHere("bounced", null), side.Node.Ref);
        var (failed, steps) = await side.Outcome();
        Assert.Equal(["the snapshot", "the console's state", "the target's answer to the offer", "the transfer", "the release of the VM here", "the start on the target"],
            steps);
        Assert.Contains($"{side.TargetNode} could not start it", failed.Why);
        Assert.Contains($"it runs on {side.SourceNode} again, from the snapshot", failed.Why);
        Assert.Equal(side.SourceNode, failed.RunsOn);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (Incoming("bounced").Length > 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the target kept the files of a VM it did not start");
            await Task.Delay(50);
        }
    }

    [Fact]
    public async Task Pre_copy_rounds_send_memory_while_the_vm_runs_and_the_stop_sends_only_the_pages_written_since()
    {
        var (source, target) = await _cluster.TwoNodes();
        var side = new SourceSide(source, target);
        // A downtime limit no page fits under: rounds go on until a copy finds nothing written.
        side.Start("warm", reportProgress: true, stopAndCopy: false, maxDowntime: TimeSpan.FromTicks(1));
        const int pages = 1024; // 4 MiB
        var memory = new byte[pages * 4096];
        void Put(int page, byte value) => memory.AsSpan(page * 4096, 4096).Fill(value);
        for (var p = 0; p < 256; p += 3) Put(p, (byte)(p % 251 + 1)); // a third of its first MiB written, the rest holes

        await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.TrackMemoryWrites>(t => t.On, TimeSpan.FromSeconds(30));
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.WritesTracked(0, null), side.Vm.Ref);
        // Round 1: all of memory, written while the VM runs (no Pause yet).
        var copy = await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.CopyMemory>(c => !c.WrittenOnly, TimeSpan.FromSeconds(30));
        File.WriteAllBytes(copy.Path, memory);
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.MemorySaved(0, 86, memory.Length, null), side.Vm.Ref);

        // Round 2: the pages "the guest wrote" meanwhile, a page that became all zeroes among them.
        ulong[] written = [1, 2, 3, 600, 601];
        foreach (var p in written) Put((int)p, 0xEE);
        Put(601, 0);
        copy = await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.CopyMemory>(c => c.WrittenOnly, TimeSpan.FromSeconds(60));
        File.WriteAllBytes(copy.Path, memory);
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.MemorySaved(0, written.Length, memory.Length, null) { Written = written }, side.Vm.Ref);

        // Round 3 finds nothing written: the VM stops, and the snapshot adds the pages written since.
        copy = await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.CopyMemory>(c => c.WrittenOnly, TimeSpan.FromSeconds(60));
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.MemorySaved(0, 0, memory.Length, null) { Written = [] }, side.Vm.Ref);
        await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.Pause>(TimeSpan.FromSeconds(30));
        var take = await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.TakeSnapshot>(TimeSpan.FromSeconds(30));
        Assert.Equal(copy.Path, take.PrecopiedMemory);
        ulong[] last = [0, 3, 1023];
        foreach (var p in last) Put((int)p, 0x77);
        Put(3, 0);
        // A disk that is not there on the target: its start fails after the commit, so the test sees the files.
        var parts = VmRestoreTests.Good() with { Spec = VmRestoreTests.Good().Spec with { Disk = new ActorVmm.Host.Vm.DiskSpec(_dir.File("absent.img")) } };
        VmRestoreTests.Write(parts, take.Directory, memory.Length, stream => stream.Write(memory));
        File.Delete(take.PrecopiedMemory!); // the snapshot took it as its memory part
        side.Migration.Tell(new ActorVmm.Host.Vm.VmProtocol.SnapshotTaken("warm", take.Directory, 3, memory.Length, TimeSpan.Zero, TimeSpan.Zero, false)
            { WrittenPages = last }, side.Vm.Ref);
        await side.Console.ExpectMsgAsync<ConsoleProtocol.GetState>(TimeSpan.FromSeconds(30));
        side.Migration.Tell(Console("so far\n"), side.Console.Ref);

        await side.Node.ExpectMsgAsync<MigrationSource.EndForMove>(TimeSpan.FromSeconds(60));
        // The target's memory file is the source's, byte for byte, though the stop sent 3 pages of it.
        var arrived = Assert.Single(Incoming("warm"));
        Assert.True(memory.AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(arrived, MigrationProtocol.MemoryFile))),
            "the memory the target put together differs from the source's");
        side.Migration.Tell(new MigrationSource.Released("warm"));
        await side.Node.ExpectMsgAsync<MigrationSource.RestartHere>(TimeSpan.FromSeconds(60));
        side.Migration.Tell(new MigrationSource.RestartedHere("warm", null), side.Node.Ref);

        var steps = new List<MigrationProtocol.Progress>();
        while (await side.Ctl.ExpectMsgAsync<object>(TimeSpan.FromSeconds(60)) is MigrationProtocol.Progress p) steps.Add(p);
        var names = steps.Select(p => p.Step).Where((step, i) => i == 0 || steps[i - 1].Step != step).ToList();
        Assert.Equal(["tracking the guest's writes", "round 1: copying guest memory", "the target's answer to the offer", "round 1: sending guest memory",
            "round 2: copying the pages written", "round 2: sending 5 pages", "round 3: copying the pages written", "the snapshot", "the console's state",
            "the target's answer to the offer", "the transfer", "the release of the VM here", "the start on the target"], names);
        // The guest ran through the rounds. Sent: round 1 the first MiB (the chunks not all zeroes), round 2
        // its 5 pages, the stop its 3.
        Assert.All(steps.TakeWhile(p => p.Step != "the snapshot"), p => Assert.False(p.Paused, $"stopped during {p.Step}"));
        Assert.Equal(256 + written.Length + last.Length, steps[^1].PagesSent);
        Assert.Equal(2, steps[^1].Round);
    }

    [Fact]
    public async Task A_target_node_that_goes_away_during_pre_copy_leaves_the_vm_running_on_the_source_untracked()
    {
        var (source, target) = await _cluster.TwoNodes();
        var side = new SourceSide(source, target);
        side.Start("runs-on", stopAndCopy: false);
        await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.TrackMemoryWrites>(t => t.On, TimeSpan.FromSeconds(30));
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.WritesTracked(0, null), side.Vm.Ref);
        var copy = await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.CopyMemory>(TimeSpan.FromSeconds(30));
        // The target's node leaves during the first round.
        await target.Terminate();
        File.WriteAllBytes(copy.Path, new byte[1 << 20]);
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.MemorySaved(0, 0, 1 << 20, null), side.Vm.Ref);

        // The VM was never stopped: it is only told to stop tracking its writes.
        var untracked = await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.TrackMemoryWrites>(TimeSpan.FromSeconds(60));
        Assert.False(untracked.On);
        Assert.StartsWith($"to {side.TargetNode} failed after", (await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.RecordMigration>()).Report);
        var failed = await side.Ctl.ExpectMsgAsync<MigrationProtocol.MigrationFailed>(TimeSpan.FromSeconds(30));
        Assert.Contains($"it goes on running on {side.SourceNode}", failed.Why);
        side.Vm.ExpectNoMsg(TimeSpan.FromMilliseconds(300)); // no Pause, no Resume
        side.Node.ExpectNoMsg(TimeSpan.FromMilliseconds(100));
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (File.Exists(copy.Path))
        {
            Assert.True(DateTime.UtcNow < deadline, $"{copy.Path} is still there");
            await Task.Delay(50);
        }
    }

    [Fact]
    public async Task A_vm_that_cannot_track_its_writes_moves_by_stop_and_copy_and_says_why()
    {
        var (source, target) = await _cluster.TwoNodes();
        var side = new SourceSide(source, target);
        side.Start("cold", reportProgress: true, stopAndCopy: false);
        await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.TrackMemoryWrites>(t => t.On, TimeSpan.FromSeconds(30));
        side.Migration.Tell(new ActorVmm.Memory.VmspaceProtocol.WritesTracked(0, "the VM's dirty tracking (dirty-ring) already uses KVM's dirty log"), side.Vm.Ref);
        // Straight to the stop: no memory is copied while the VM runs.
        var directory = await side.Snapshot(d => VmRestoreTests.Write(VmRestoreTests.Good(), d, 1 << 20));
        await target.Terminate(); // the rest is stop-and-copy's, tested above: give it up here
        await side.Snapshotted(directory, asked: false);
        await side.Vm.ExpectMsgAsync<ActorVmm.Host.Vm.VmProtocol.Resume>(TimeSpan.FromSeconds(60));
        var (_, steps) = await side.Outcome();
        Assert.Equal(["tracking the guest's writes", "no pre-copy: the VM's dirty tracking (dirty-ring) already uses KVM's dirty log", "the snapshot"],
            steps.Take(3));
    }

    [Fact]
    public async Task Migrating_a_vm_the_node_does_not_run_is_refused_with_the_reason()
    {
        var (source, target) = await _cluster.TwoNodes();
        var probe = new TestProbe(source, new XunitAssertions());
        NodeActor(source, source).Tell(new MigrationProtocol.MigrateVm("nothing", NodeProtocol.NodeName(Akka.Cluster.Cluster.Get(target).SelfAddress)), probe.Ref);
        var failed = await probe.ExpectMsgAsync<MigrationProtocol.MigrationFailed>(TimeSpan.FromSeconds(30));
        Assert.Contains("no VM named nothing runs on", failed.Why);
        Assert.Equal("", failed.RunsOn);
    }
}
