using Akka.Actor;
using ActorVmm.Host.Config;
using ActorVmm.Host.Snapshot;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using Serilog;
using WriteLogs = ActorVmm.Memory.VmspaceProtocol.WriteLogs;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// Checkpoints and failover (<c>actorvmm.vm.checkpoint { interval, directory }</c>). A host node
/// checkpoints each of its VMs that asks for it into DIRECTORY/NAME/checkpoint-NNNNNN, on storage
/// every node sees. Each checkpoint is a snapshot (<see cref="VmProtocol.TakeSnapshot"/>), written to a
/// new directory whose manifest is written last: a directory without one (its node died while
/// writing it) is never used. After the first, a checkpoint starts from a copy of the one before's
/// memory file and writes into it only the pages written since (the VM's "checkpoint" write log,
/// <see cref="Memory.VmspaceProtocol.TrackWrites"/>). The last two complete checkpoints are kept.
/// <para>After each checkpoint the node tells every node actor of the cluster where the VM runs and
/// where its checkpoints are (<see cref="Checkpointed"/>). When the cluster removes a node (it died
/// and was downed), the oldest node that is up starts each VM the removed node ran again from its
/// last complete checkpoint, reading all of its memory before it starts (the checkpoints go on and
/// the older ones are removed).</para>
/// </summary>
public static class CheckpointProtocol
{
    public const string Prefix = "checkpoint-";

    /// <summary>To every node actor, when a VM with checkpoints starts on a node and after each of its
    /// complete checkpoints: VM <paramref name="Name"/> runs on <paramref name="Node"/> with
    /// <paramref name="Settings"/>, its checkpoints in <paramref name="Directory"/>. A node keeps the one
    /// of highest <paramref name="Generation"/>: 2n after checkpoint n, 2n + 1 at a start after it, so
    /// that a late word from a node the VM left never outweighs its new node's.</summary>
    public sealed record Checkpointed(string Name, string Node, NodeProtocol.Setting[] Settings, string Directory, long Generation)
        : NodeProtocol.INodeMessage;

    /// <summary>To every node actor: VM <paramref name="Name"/> no longer runs on <paramref name="Node"/>
    /// (it ended, or moved and its new node will say so): no failover for it from there.</summary>
    public sealed record Forget(string Name, string Node) : NodeProtocol.INodeMessage;

    /// <summary>The directory of VM <paramref name="vm"/>'s checkpoints under <paramref name="root"/>.</summary>
    public static string VmDirectory(string root, string vm) => Path.Combine(root, vm);

    /// <summary>The complete checkpoints under <paramref name="vmDirectory"/> (their manifest written),
    /// newest first.</summary>
    public static List<(long Sequence, string Path)> Complete(string vmDirectory) =>
        [.. All(vmDirectory).Where(c => File.Exists(Path.Combine(c.Path, SnapshotDirectory.ManifestFile)))];

    /// <summary>Every checkpoint directory under <paramref name="vmDirectory"/>, complete or not, newest first.</summary>
    internal static List<(long Sequence, string Path)> All(string vmDirectory)
    {
        if (!Directory.Exists(vmDirectory)) return [];
        var found = new List<(long, string)>();
        foreach (var d in Directory.GetDirectories(vmDirectory, Prefix + "*"))
            if (long.TryParse(Path.GetFileName(d)[Prefix.Length..], System.Globalization.NumberStyles.None,
                    System.Globalization.CultureInfo.InvariantCulture, out var n))
                found.Add((n, d));
        return [.. found.OrderByDescending(c => c.Item1)];
    }

    internal static string NameOf(long sequence) => $"{Prefix}{sequence:D6}";
}

/// <summary>
/// Checkpoints one VM of this node every interval (a child of the node actor; see
/// <see cref="CheckpointProtocol"/>). One checkpoint at a time; one that fails (the VM busy with a
/// snapshot or a migration, a full disk) is logged, removed and tried again at the next interval, whole.
/// </summary>
internal sealed class Checkpointer : ReceiveActor, IWithTimers
{
    internal sealed record Job(string Name, IActorRef Vm, CheckpointSpec Spec, NodeProtocol.Setting[] Settings, string Node);

    /// <summary>No checkpoint begins while held (a migration of the VM runs); one under way finishes.</summary>
    internal sealed record Hold(bool On);

    private sealed record Tick
    {
        public static readonly Tick Instance = new();
    }

    private readonly Job _job;
    private readonly string _directory;
    private long _sequence;
    private bool _incremental;
    private string? _base;          // the last checkpoint this actor wrote with the write log on
    private string? _writing;       // the checkpoint being written
    private string? _memoryCopy;    // its memory file, a copy of the base's, while being written
    private bool _held;

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(Job job) => Akka.Actor.Props.Create(() => new Checkpointer(job));

    public Checkpointer(Job job)
    {
        _job = job;
        _directory = CheckpointProtocol.VmDirectory(job.Spec.Directory, job.Name);
        Receive<Memory.VmspaceProtocol.WritesTracked>(t =>
        {
            _incremental = t.Error is null;
            if (t.Error is { } why) Log.Warning("checkpoints of {Name}: each is whole ({Why})", _job.Name, why);
        });
        Receive<Tick>(_ =>
        {
            if (!_held) Take();
        });
        Receive<Hold>(h => _held = h.On);
        Receive<VmProtocol.SnapshotTaken>(Taken);
        Receive<VmProtocol.SnapshotFailed>(f => Failed(f.Reason));
    }

    protected override void PreStart()
    {
        try
        {
            Directory.CreateDirectory(_directory);
            _sequence = CheckpointProtocol.All(_directory).Select(c => c.Sequence).DefaultIfEmpty(0).Max();
            // Memory copies of checkpoints whose node died while writing them.
            foreach (var stale in Directory.GetFiles(_directory, CheckpointProtocol.Prefix + "*.memory")) File.Delete(stale);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Log.Error("checkpoints of {Name}: cannot use {Directory}: {Reason}", _job.Name, _directory, e.Message);
        }
        _job.Vm.Tell(new VmProtocol.TrackMemoryWrites(true, WriteLogs.Checkpoint));
        Timers.StartPeriodicTimer("tick", Tick.Instance, _job.Spec.Interval);
        Announce(2 * _sequence + 1);
    }

    /// <summary>Every node learns where the VM runs and where it can start again from.</summary>
    private void Announce(long generation)
    {
        var told = new CheckpointProtocol.Checkpointed(_job.Name, _job.Node, _job.Settings, _directory, generation);
        foreach (var m in Akka.Cluster.Cluster.Get(Context.System).State.Members.Where(m => m.Status == Akka.Cluster.MemberStatus.Up))
            Context.ActorSelection(new RootActorPath(m.Address) / "user" / Control.ControlProtocol.DirectoryName).Tell(told);
    }

    private void Take()
    {
        if (_writing is not null) return;
        _writing = Path.Combine(_directory, CheckpointProtocol.NameOf(++_sequence));
        try
        {
            if (_incremental && _base is not null)
            {
                // The one before's memory, copied (sparse, in the kernel); the snapshot adds the pages written since.
                _memoryCopy = _writing + ".memory";
                using var from = File.OpenHandle(Path.Combine(_base, MigrationProtocol.MemoryFile));
                using var to = File.OpenHandle(_memoryCopy, FileMode.Create, FileAccess.ReadWrite);
                var length = RandomAccess.GetLength(from);
                RandomAccess.SetLength(to, length);
                foreach (var (offset, n) in SparseFiles.DataRanges(from, 0, (ulong)length))
                    SparseFiles.Copy(from, (long)offset, to, (long)offset, (long)n);
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Failed($"cannot copy the memory of {_base}: {e.Message}");
            return;
        }
        _job.Vm.Tell(new VmProtocol.TakeSnapshot(_writing, PrecopiedMemory: _memoryCopy, WriteLog: _incremental ? WriteLogs.Checkpoint : null));
    }

    private void Taken(VmProtocol.SnapshotTaken t)
    {
        if (_writing is null || t.Directory != Path.GetFullPath(_writing)) return;
        var done = _writing;
        _writing = _memoryCopy = null;
        _base = _incremental ? done : null;
        // Older checkpoints than the one before go.
        Announce(2 * _sequence);
        foreach (var (_, old) in CheckpointProtocol.All(_directory).Skip(2)) MigrationProtocol.DeleteQuietly(old);
        Log.Debug("VM {Name} checkpointed to {Directory} ({Pages} pages written)", _job.Name, done, t.MemoryPages);
    }

    private void Failed(string why)
    {
        Log.Warning("checkpoint of {Name} not taken: {Why}", _job.Name, why);
        if (_writing is not null) MigrationProtocol.DeleteQuietly(_writing);
        if (_memoryCopy is not null)
            try { File.Delete(_memoryCopy); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { Log.Warning("cannot remove {File}: {Reason}", _memoryCopy, e.Message); }
        _writing = _memoryCopy = null;
        // Pages the failed snapshot took from the write log are not in the base: the next one is whole.
        _base = null;
    }

    protected override void PostStop()
    {
        _job.Vm.Tell(new VmProtocol.TrackMemoryWrites(false, WriteLogs.Checkpoint));
        if (_writing is not null && !File.Exists(Path.Combine(_writing, SnapshotDirectory.ManifestFile))) MigrationProtocol.DeleteQuietly(_writing);
        if (_memoryCopy is not null)
            try { File.Delete(_memoryCopy); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }
}
