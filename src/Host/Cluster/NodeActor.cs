using System.Diagnostics;
using Akka.Actor;
using Akka.Cluster;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using Akka.Configuration;
using Serilog;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// A host node's VMs, at /user/vmm: it starts the VMs the placement singleton sends it, lists them
/// (and, asked by `ctl`, the whole cluster's), reports its load, and keeps an ended VM listed with
/// its outcome until the name is used again. Each VM is built on a pool thread (KVM set-up and image
/// loading block), its serial output goes to a console hub (<see cref="ConsoleProtocol"/>), and when it
/// ends its resources are released off this actor's thread.
/// </summary>
public sealed class NodeActor : ReceiveActor
{
    /// <summary>Names a VM cannot have: actors of a host node at /user.</summary>
    public static readonly string[] ReservedNames = [ControlProtocol.DirectoryName, PlacementActor.ManagerName, PlacementActor.ProxyName];

    private sealed class Slot(string name, int vcpus, long memory, IActorRef console, NodeProtocol.Setting[]? settings = null)
    {
        public string Name { get; } = name;
        /// <summary>The settings it was started with (what a migration gives the next node).</summary>
        public NodeProtocol.Setting[] Settings { get; } = settings ?? [];
        /// <summary>Its migration away from here while one runs.</summary>
        public IActorRef? Migration { get; set; }
        /// <summary>Set once a migration ends it here for a start on that node.</summary>
        public string? MovingTo { get; set; }
        /// <summary>A snapshot directory it was restored from (its memory is read from it): removed when it ends.</summary>
        public string? Directory { get; set; }
        /// <summary>It has devices on other nodes.</summary>
        public bool RemoteDevices { get; set; }
        /// <summary>Its checkpoints' writer while it runs here.</summary>
        public IActorRef? Checkpointer { get; set; }
        /// <summary>How it came here, if not by `ctl run` (<see cref="ControlProtocol.VmEntry.Origin"/>).</summary>
        public string Origin { get; set; } = "";
        public int Vcpus { get; } = vcpus;
        public long MemoryBytes { get; } = memory;
        public IActorRef Console { get; } = console;
        public IActorRef Actor { get; set; } = ActorRefs.Nobody;
        public IActorRef Trace { get; set; } = ActorRefs.Nobody;
        public string Ended { get; set; } = "";
        public Built? Resources { get; set; }
    }

    /// <summary>A VM built on a pool thread, with what it owns.</summary>
    private sealed record Built(string Name, RunningVm Vm, SerialConsole Console, TraceRecorder? Trace, string? Perfetto, double TimeoutSeconds,
        bool VirtioConsole = false, CheckpointSpec? Checkpoint = null);

    /// <summary>Why a VM is built: `ctl run`, a migration's start here, or a start again after a migration
    /// away failed after its commit.</summary>
    private enum BuildKind { Run, MigratedIn, RestartedHere, FailedOver }

    private sealed record BuildDone(string Name, Built? Result, string? Error, IActorRef ReplyTo, BuildKind Kind = BuildKind.Run);

    private sealed record Ended(string Name, VmProtocol.Outcome Outcome);

    /// <summary>Stop every VM; answered with <see cref="AllStopped"/> once each has ended.</summary>
    public sealed record StopAll : NodeProtocol.INodeMessage { public static readonly StopAll Instance = new(); }

    public sealed record AllStopped : NodeProtocol.INodeMessage { public static readonly AllStopped Instance = new(); }

    private readonly Akka.Configuration.Config _defaults;
    private readonly IActorRef _placement;
    private readonly string _node;
    private readonly Dictionary<string, Slot> _vms = new(StringComparer.Ordinal);
    private readonly List<IActorRef> _stopWaiters = [];
    private readonly Akka.Cluster.Cluster _cluster = Akka.Cluster.Cluster.Get(Context.System);

    /// <summary>The checkpointed VMs of the cluster, as their nodes last told (<see cref="CheckpointProtocol"/>).</summary>
    private readonly Dictionary<string, CheckpointProtocol.Checkpointed> _checkpointed = new(StringComparer.Ordinal);

    public static Props Props(Akka.Configuration.Config defaults, IActorRef placement) =>
        Akka.Actor.Props.Create(() => new NodeActor(defaults, placement));

    public NodeActor(Akka.Configuration.Config defaults, IActorRef placement)
    {
        _defaults = defaults;
        _placement = placement;
        _node = NodeProtocol.NodeName(_cluster.SelfAddress);

        Receive<NodeProtocol.RunVm>(r => _placement.Forward(r));
        Receive<NodeProtocol.StartVm>(Start);
        Receive<RemoteDevices.HostDevice>(h => RemoteDevices.Host(Context, h));
        Receive<MigrationProtocol.MigrateVm>(MigrateAway);
        Receive<MigrationProtocol.Offer>(Offered);
        Receive<MigrationTarget.StartMigrated>(StartMigrated);
        Receive<MigrationSource.EndForMove>(EndForMove);
        Receive<MigrationSource.Moved>(Moved);
        Receive<MigrationSource.RestartHere>(RestartHere);
        Receive<MigrationProtocol.Migrated>(m =>
        {
            if (_vms.TryGetValue(m.Name, out var slot) && slot.Resources is not null) slot.Actor.Tell(new VmProtocol.RecordMigration(m.ToString()));
        });
        Receive<CheckpointProtocol.Checkpointed>(c =>
        {
            if (c.Name is null || c.Node is null || c.Settings is null || c.Directory is null) return;
            if (!_checkpointed.TryGetValue(c.Name, out var known) || known.Generation <= c.Generation) _checkpointed[c.Name] = c;
        });
        Receive<CheckpointProtocol.Forget>(f =>
        {
            if (f.Name is not null && _checkpointed.TryGetValue(f.Name, out var c) && c.Node == f.Node) _checkpointed.Remove(f.Name);
        });
        Receive<ClusterEvent.MemberRemoved>(r => FailOver(r.Member));
        Receive<BuildDone>(OnBuilt);
        Receive<Ended>(OnEnded);
        Receive<NodeProtocol.GetLoad>(_ =>
        {
            var live = _vms.Values.Where(v => v.Ended.Length == 0).ToList();
            Sender.Tell(new NodeProtocol.Load(_node, live.Sum(v => v.Vcpus), live.Sum(v => v.MemoryBytes), _vms.Keys.Order().ToArray(),
                Environment.ProcessorCount, GC.GetGCMemoryInfo().TotalAvailableMemoryBytes));
        });
        Receive<NodeProtocol.ListLocal>(_ => Sender.Tell(new NodeProtocol.LocalVms(_node, Entries())));
        Receive<ControlProtocol.ListVms>(_ => ListCluster());
        Receive<NodeProtocol.ListNodes>(_ =>
        {
            var state = _cluster.State;
            var unreachable = state.Unreachable.Select(m => m.Address).ToHashSet();
            Sender.Tell(new NodeProtocol.Members(_node, state.Leader is { } l ? NodeProtocol.NodeName(l) : "",
                state.Members.OrderBy(m => m.Address.Port).Select(m => new NodeProtocol.Member(NodeProtocol.NodeName(m.Address), m.Status.ToString(),
                    !unreachable.Contains(m.Address), m.Roles.Order().ToArray())).ToArray()));
        });
        Receive<ControlProtocol.Register>(r =>
        {
            // A VM made in this process by other means (tests): listed like the node's own.
            _vms[r.Vm] = new Slot(r.Vm, 0, 0, r.Console) { Actor = r.Actor, Trace = r.Trace };
            Context.Watch(r.Actor);
        });
        Receive<Terminated>(t =>
        {
            foreach (var slot in _vms.Values.Where(v => v.Resources is null && v.Actor.Equals(t.ActorRef)).ToList()) _vms.Remove(slot.Name);
        });
        Receive<MigrationOver>(o =>
        {
            if (!_vms.TryGetValue(o.Name, out var slot) || !o.Migration.Equals(slot.Migration)) return;
            slot.Migration = null;
            slot.Checkpointer?.Tell(new Checkpointer.Hold(false));
        });
        Receive<StopAll>(_ =>
        {
            _stopWaiters.Add(Sender);
            foreach (var slot in _vms.Values.Where(v => v.Ended.Length == 0 && v.Resources is not null))
                slot.Actor.Tell(new VmProtocol.Stop("the host node is shutting down"));
            AnswerStopWaiters();
        });
    }

    private ControlProtocol.VmEntry[] Entries() =>
        _vms.Values.OrderBy(v => v.Name, StringComparer.Ordinal)
            .Select(v => new ControlProtocol.VmEntry(v.Name, v.Actor, v.Trace, v.Console, _node, v.Ended) { Origin = v.Origin }).ToArray();

    /// <summary>Every reachable Up member's VMs, gathered; a member that does not answer in time is left out
    /// (30 s: the first message between two nodes builds their serializers, seconds on a slow machine).</summary>
    private void ListCluster()
    {
        var state = _cluster.State;
        var members = state.Members.Where(m => m.Status == MemberStatus.Up && !state.Unreachable.Contains(m)).Select(m => m.Address).ToList();
        if (!members.Contains(_cluster.SelfAddress)) members.Add(_cluster.SelfAddress);
        var asks = members.Select(async address =>
        {
            try
            {
                return await Context.ActorSelection(new RootActorPath(address) / "user" / ControlProtocol.DirectoryName)
                    .Ask<NodeProtocol.LocalVms>(NodeProtocol.ListLocal.Instance, TimeSpan.FromSeconds(30));
            }
            catch (Exception) { return new NodeProtocol.LocalVms(NodeProtocol.NodeName(address), []); }
        }).ToList();
        var node = _node;
        Task.WhenAll(asks).ContinueWith(t => (object)new ControlProtocol.VmList(node, Environment.ProcessId,
                t.Result.SelectMany(l => l.Vms).OrderBy(v => v.Name, StringComparer.Ordinal).ToArray()),
            TaskContinuationOptions.ExecuteSynchronously).PipeTo(Sender);
    }

    private void Start(NodeProtocol.StartVm start)
    {
        var name = start.Name;
        string? refusal = null;
        if (!ActorPath.IsValidPathElement(name) || name.StartsWith('$') || ReservedNames.Contains(name))
            refusal = $"\"{name}\" cannot name a VM: use letters, digits, '-' and '_'";
        else if (_vms.TryGetValue(name, out var existing) && existing.Ended.Length == 0)
            refusal = $"a VM named {name} already runs on {_node}";
        else if (start.Settings.FirstOrDefault(s => !s.Key.StartsWith("actorvmm.vm.", StringComparison.Ordinal)) is { } foreign)
            refusal = $"setting {foreign.Key} is not a VM setting (actorvmm.vm.*)";
        if (refusal is not null)
        {
            Sender.Tell(new NodeProtocol.RunRefused(name, refusal));
            return;
        }
        if (!TryConfig(name, start.Settings, out var hocon, out var vm, out var error))
        {
            Sender.Tell(new NodeProtocol.RunRefused(name, error));
            return;
        }
        var members = _cluster.State.Members.Where(m => m.Status == MemberStatus.Up).Select(m => NodeProtocol.NodeName(m.Address)).ToHashSet();
        if (vm.DeviceNodes.FirstOrDefault(d => !members.Contains(d.Value)) is { Key: not null } absent)
        {
            Sender.Tell(new NodeProtocol.RunRefused(name, $"actorvmm.vm.devices.{absent.Key}.node: no node {absent.Value} is up in the cluster"));
            return;
        }
        if (_vms.TryGetValue(name, out var old)) Context.Stop(old.Console); // an ended VM's name used again
        var hub = Context.ActorOf(ConsoleProtocol.Props(name), $"console-{name}-{Guid.NewGuid():N}");
        _vms[name] = new Slot(name, vm.Cpus, (long)vm.MemoryBytes, hub, start.Settings) { RemoteDevices = vm.DeviceNodes.Count > 0 };
        BuildAsync(name, hocon, vm, hub, null, Sender, BuildKind.Run);
    }

    /// <summary>Builds the VM on a pool thread and tells this actor <see cref="BuildDone"/>.</summary>
    private void BuildAsync(string name, Akka.Configuration.Config hocon, VmConfig vm, IActorRef hub, Snapshot.VmRestore? restore,
        IActorRef replyTo, BuildKind kind)
    {
        var system = Context.System;
        var self = Self;
        Task.Run(() =>
        {
            try { return new BuildDone(name, Build(system, hocon, vm, hub, restore), null, replyTo, kind); }
            catch (Exception e) when (e is ConfigException or BootException or VmBuildException or IOException or UnauthorizedAccessException
                                          or InvalidActorNameException or Snapshot.SnapshotException)
            {
                return new BuildDone(name, null, e.Message, replyTo, kind);
            }
            catch (Exception e)
            {
                Log.Error(e, "building VM {Name} failed", name);
                return new BuildDone(name, null, $"{e.GetType().Name}: {e.Message}", replyTo, kind);
            }
        }).PipeTo(self);
    }

    /// <summary>Builds and starts the VM (a pool thread): what `run` does in a process of its own; with
    /// <paramref name="restore"/>, the snapshot's machine where it stopped.</summary>
    private static Built Build(ActorSystem system, Akka.Configuration.Config hocon, VmConfig vm, IActorRef hub, Snapshot.VmRestore? restore = null)
    {
        var boot = restore is null ? BootSource.FromConfig(hocon) : null;
        var console = SerialConsole.ToSink(bytes => hub.Tell(new ConsoleProtocol.Output(bytes)),
            vm.SerialOutput == "stdout" ? null : vm.SerialOutput);
        TraceRecorder? trace = null;
        try
        {
            if (vm.TracePath is not null || vm.PerfettoPath is not null || vm.TraceLive)
                trace = new TraceRecorder(vm.TracePath, filter: Tracing.TraceFilter.Parse(vm.TraceFilter));
            var spec = restore?.ToSpec(vm.Name)
                       ?? new VmSpec(vm.Name, vm.MemoryBytes, vm.Cpus, boot!, vm.Lapic, vm.Paging, vm.Superpages, vm.SharedMemory, vm.TestDevices) { Cpu = vm.Cpu, Rng = vm.Rng, Disk = vm.Disk, VirtioConsole = vm.VirtioConsole, Net = vm.Net, DeviceNodes = vm.DeviceNodes };
            var builder = new VmBuilder(system, spec).WithStandardDevices(console);
            if (restore is not null) builder.WithRestore(restore);
            if (trace is not null) builder.WithTrace(trace);
            var running = builder.Start();
            return new Built(vm.Name, running, console, trace, vm.PerfettoPath, vm.TimeoutSeconds, spec.VirtioConsole, vm.Checkpoint);
        }
        catch
        {
            console.Dispose();
            trace?.DisposeAsync().AsTask().Wait();
            throw;
        }
    }

    private void OnBuilt(BuildDone done)
    {
        if (!_vms.TryGetValue(done.Name, out var slot)) return;
        if (done.Result is not { } built)
        {
            var why = done.Error ?? "the VM could not be built";
            if (done.Kind == BuildKind.RestartedHere)
            {
                slot.Console.Tell(new ConsoleProtocol.VmEnded($"it could not be started again here after a failed migration: {why}"));
                slot.Ended = $"lost in a failed migration: {why}";
                if (slot.Directory is { } d) MigrationProtocol.DeleteQuietly(d);
                done.ReplyTo.Tell(new MigrationSource.RestartedHere(done.Name, why));
                return;
            }
            if (done.Kind == BuildKind.FailedOver) Log.Error("VM {Name} could not be started again here: {Why}", done.Name, why);
            Context.Stop(slot.Console);
            _vms.Remove(done.Name);
            if (slot.Directory is { } dir) MigrationProtocol.DeleteQuietly(dir);
            done.ReplyTo.Tell(done.Kind == BuildKind.MigratedIn
                ? new MigrationProtocol.Refused(done.Name, why)
                : new NodeProtocol.RunRefused(done.Name, why));
            return;
        }
        slot.Resources = built;
        slot.Actor = built.Vm.Actor;
        if (built.Trace is not null) slot.Trace = Context.ActorOf(TraceProtocol.Props(done.Name, built.Trace), $"trace-{done.Name}-{Guid.NewGuid():N}");
        slot.Console.Tell(new ConsoleProtocol.Connect(built.Vm.Actor, built.VirtioConsole));
        if (built.Checkpoint is { } checkpoint)
            slot.Checkpointer = Context.ActorOf(Checkpointer.Props(new Checkpointer.Job(done.Name, built.Vm.Actor, checkpoint, slot.Settings, _node)),
                $"checkpoints-{done.Name}-{Guid.NewGuid():N}");
        var self = Self;
        var name = done.Name;
        var ending = built.TimeoutSeconds > 0 ? built.Vm.WaitAsync(TimeSpan.FromSeconds(built.TimeoutSeconds)) : built.Vm.Ended;
        ending.ContinueWith(t => self.Tell(new Ended(name, t.Result)), TaskContinuationOptions.ExecuteSynchronously);
        done.ReplyTo.Tell(done.Kind switch
        {
            BuildKind.MigratedIn => new MigrationProtocol.Started(done.Name, _node, slot.Console),
            BuildKind.RestartedHere => new MigrationSource.RestartedHere(done.Name, null),
            _ => (object)new NodeProtocol.VmStarted(done.Name, _node),
        });
        Log.Information("VM {Name} started on {Node}{How}", done.Name, _node, done.Kind switch
        {
            BuildKind.MigratedIn => " (migrated in)",
            BuildKind.RestartedHere => " (again, after a failed migration)",
            BuildKind.FailedOver => $" ({slot.Origin})",
            _ => "",
        });
    }

    private void OnEnded(Ended e)
    {
        if (!_vms.TryGetValue(e.Name, out var slot) || slot.Resources is not { } built) return;
        var moving = slot.MovingTo;
        var migration = slot.Migration;
        var detail = moving is not null ? $"moving to {moving}" : $"{HostRunner.Describe(e.Outcome)} (exit code {e.Outcome.ExitCode})";
        slot.Ended = detail;
        if (slot.Checkpointer is { } checkpointer)
        {
            Context.Stop(checkpointer);
            slot.Checkpointer = null;
            // Ended for good: no node starts it again. Moved: its new node tells where it runs.
            if (moving is null) TellEveryNode(new CheckpointProtocol.Forget(e.Name, _node));
        }
        var directory = slot.Directory;
        slot.Directory = null;
        slot.Resources = null;
        slot.Actor = ActorRefs.Nobody;
        if (!slot.Trace.IsNobody()) Context.Stop(slot.Trace);
        slot.Trace = ActorRefs.Nobody;
        var hub = slot.Console;
        var name = e.Name;
        _ = Task.Run(async () =>
        {
            // The hub hears of the end whatever releasing the VM does: a console client waits for it.
            try
            {
                built.Console.Flush();
                await built.Vm.DisposeAsync();
            }
            catch (Exception x)
            {
                Log.Error(x, "releasing VM {Name} failed", name);
            }
            finally
            {
                built.Console.Dispose();
                // A VM moving elsewhere has not ended: its hub hears of the move (MovedTo) instead.
                if (moving is null) hub.Tell(new ConsoleProtocol.VmEnded(detail));
                else migration?.Tell(new MigrationSource.Released(name));
                if (directory is not null) MigrationProtocol.DeleteQuietly(directory);
            }
            if (built.Trace is not null)
            {
                if (built.Perfetto is not null)
                {
                    try
                    {
                        await using var file = File.Create(built.Perfetto);
                        PerfettoExport.Write(built.Trace.Snapshot(), file, $"ActorVmm {built.Name}");
                    }
                    catch (Exception x) when (x is IOException or UnauthorizedAccessException)
                    {
                        Log.Warning("cannot write {Path}: {Reason}", built.Perfetto, x.Message);
                    }
                }
                await built.Trace.DisposeAsync();
            }
        });
        Log.Information("VM {Name} ended: {Detail}", e.Name, detail);
        AnswerStopWaiters();
    }

    /// <summary>`ctl migrate`: checks the VM and the target, then leaves the migration to a
    /// <see cref="MigrationSource"/>, which answers the requester.</summary>
    private void MigrateAway(MigrationProtocol.MigrateVm m)
    {
        string? refusal = null;
        var members = _cluster.State.Members.Where(x => x.Status == MemberStatus.Up).ToDictionary(x => NodeProtocol.NodeName(x.Address), x => x.Address);
        if (!_vms.TryGetValue(m.Name, out var slot) || slot.Resources is null || slot.Ended.Length > 0)
            refusal = slot is null ? $"no VM named {m.Name} runs on {_node}" : $"{m.Name} is not running on {_node} ({(slot.Ended.Length > 0 ? slot.Ended : "it is starting")})";
        else if (slot.Migration is not null) refusal = $"{m.Name} is already being migrated";
        else if (m.ToNode == _node) refusal = $"{m.Name} already runs on {m.ToNode}";
        else if (!members.ContainsKey(m.ToNode)) refusal = $"no node {m.ToNode} is up in the cluster (ctl nodes lists them)";
        else if (slot.RemoteDevices) refusal = $"{m.Name} has devices on other nodes; a VM with remote devices cannot migrate yet";
        else if (m.MaxDowntime is { } limit && (limit <= TimeSpan.Zero || limit > TimeSpan.FromHours(1)))
            refusal = $"a downtime limit of {limit.TotalMilliseconds:0} ms is not from 1 ms to an hour";
        if (refusal is not null)
        {
            Sender.Tell(new MigrationProtocol.MigrationFailed(m.Name, refusal, slot?.Resources is not null ? _node : ""));
            return;
        }
        var built = slot!.Resources!;
        slot.Migration = Context.ActorOf(MigrationSource.Props(new MigrationSource.Job(m.Name, slot.Actor, slot.Console, built.Console.Flush,
            slot.Settings, members[m.ToNode], m.ToNode, _node, Sender, m.ReportProgress, m.MaxDowntime, m.StopAndCopy)), $"migration-{m.Name}-{Guid.NewGuid():N}");
        Context.WatchWith(slot.Migration, new MigrationOver(m.Name, slot.Migration));
        slot.Checkpointer?.Tell(new Checkpointer.Hold(true));
        Log.Information("migrating VM {Name} to {Node}", m.Name, m.ToNode);
    }

    private sealed record MigrationOver(string Name, IActorRef Migration);

    /// <summary>A source node offers a VM: a <see cref="MigrationTarget"/> receives it if the name is free here.</summary>
    private void Offered(MigrationProtocol.Offer offer)
    {
        string? refusal = null;
        if (offer.Name is null || !ActorPath.IsValidPathElement(offer.Name) || offer.Name.StartsWith('$') || ReservedNames.Contains(offer.Name))
            refusal = $"\"{offer.Name}\" cannot name a VM";
        else if (_vms.TryGetValue(offer.Name, out var existing) && existing.Ended.Length == 0)
            refusal = $"a VM named {offer.Name} already runs on {_node}";
        else if (offer.Settings is null || offer.Settings.Any(x => x is null || x.Key is null || x.Value is null || !x.Key.StartsWith("actorvmm.vm.", StringComparison.Ordinal)))
            refusal = "its settings are not VM settings (actorvmm.vm.*)";
        else refusal = MigrationProtocol.CheckOffer(offer);
        if (refusal is not null)
        {
            Log.Warning("refused a migration of {Name} from {Source}: {Why}", offer.Name, Sender.Path.Address, refusal);
            Sender.Tell(new MigrationProtocol.Refused(offer.Name ?? "", refusal));
            return;
        }
        Context.ActorOf(MigrationTarget.Props(offer, Sender), $"incoming-{offer.Name}-{Guid.NewGuid():N}");
    }

    /// <summary>The commit of a migration here: the VM starts from the snapshot received, its console
    /// going on from the source's.</summary>
    private void StartMigrated(MigrationTarget.StartMigrated m)
    {
        if (_vms.TryGetValue(m.Name, out var existing) && existing.Ended.Length == 0)
        {
            MigrationProtocol.DeleteQuietly(m.Directory);
            m.Source.Tell(new MigrationProtocol.Refused(m.Name, $"a VM named {m.Name} started on {_node} meanwhile"));
            return;
        }
        if (!TryConfig(m.Name, m.Settings, out var hocon, out var vm, out var error))
        {
            MigrationProtocol.DeleteQuietly(m.Directory);
            m.Source.Tell(new MigrationProtocol.Refused(m.Name, error));
            return;
        }
        if (existing is not null) Context.Stop(existing.Console);
        if (vm.Checkpoint is { } checkpoint)
        {
            // At once, before its checkpoints go on here: no node is to start it again from the node it left.
            var directory = CheckpointProtocol.VmDirectory(checkpoint.Directory, m.Name);
            var sequence = CheckpointProtocol.All(directory).Select(c => c.Sequence).DefaultIfEmpty(0).Max();
            TellEveryNode(new CheckpointProtocol.Checkpointed(m.Name, _node, m.Settings, directory, 2 * sequence + 1));
        }
        var hub = Context.ActorOf(ConsoleProtocol.Props(m.Name, m.Console), $"console-{m.Name}-{Guid.NewGuid():N}");
        _vms[m.Name] = new Slot(m.Name, m.Restore.Spec.Cpus, (long)m.Restore.Spec.MemoryBytes, hub, m.Settings) { Directory = m.Directory };
        BuildAsync(m.Name, hocon, vm, hub, m.Restore, m.Source, BuildKind.MigratedIn);
    }

    /// <summary>The target is ready: end the VM here; its release is told to the migration, not its hub.</summary>
    private void EndForMove(MigrationSource.EndForMove e)
    {
        if (!_vms.TryGetValue(e.Name, out var slot) || slot.Resources is null || !Sender.Equals(slot.Migration))
        {
            Sender.Tell(new MigrationProtocol.Refused(e.Name, $"it ended on {_node} meanwhile ({slot?.Ended})"));
            return;
        }
        slot.MovingTo = e.To;
        slot.Actor.Tell(new VmProtocol.Stop($"migrated to {e.To}"));
    }

    /// <summary>The VM runs on another node now: it leaves this node's list, and its hub follows the new one.</summary>
    private void Moved(MigrationSource.Moved m)
    {
        if (!_vms.TryGetValue(m.Name, out var slot) || slot.MovingTo is null) return;
        _vms.Remove(m.Name);
        slot.Console.Tell(new ConsoleProtocol.MovedTo(m.Console, m.To));
        AnswerStopWaiters();
    }

    /// <summary>A migration away failed after its commit: the VM starts here again from the snapshot taken for it.</summary>
    private void RestartHere(MigrationSource.RestartHere r)
    {
        var replyTo = Sender;
        if (!_vms.TryGetValue(r.Name, out var slot) || slot.MovingTo is null)
        {
            replyTo.Tell(new MigrationSource.RestartedHere(r.Name, "it is no longer this node's"));
            return;
        }
        if (!TryConfig(r.Name, r.Settings, out var hocon, out var vm, out var error))
        {
            replyTo.Tell(new MigrationSource.RestartedHere(r.Name, error));
            return;
        }
        Snapshot.VmRestore restore;
        try { restore = Snapshot.VmRestore.Open(r.Directory); }
        catch (Snapshot.SnapshotException e)
        {
            replyTo.Tell(new MigrationSource.RestartedHere(r.Name, e.Message));
            return;
        }
        var again = new Slot(r.Name, restore.Spec.Cpus, (long)restore.Spec.MemoryBytes, slot.Console, slot.Settings) { Directory = r.Directory };
        _vms[r.Name] = again;
        BuildAsync(r.Name, hocon, vm, slot.Console, restore, replyTo, BuildKind.RestartedHere);
    }

    protected override void PreStart() =>
        _cluster.Subscribe(Self, ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents, typeof(ClusterEvent.MemberRemoved));

    protected override void PostStop() => _cluster.Unsubscribe(Self);

    private void TellEveryNode(object message)
    {
        foreach (var m in _cluster.State.Members.Where(m => m.Status == MemberStatus.Up))
            Context.ActorSelection(new RootActorPath(m.Address) / "user" / ControlProtocol.DirectoryName).Tell(message);
    }

    /// <summary>
    /// The cluster removed <paramref name="removed"/> (it died and was downed, or left): the VMs it ran
    /// with checkpoints start again from their last complete checkpoint on the oldest node that is up,
    /// which is this one if no other up node is older (every node decides the same from the same state).
    /// </summary>
    private void FailOver(Member removed)
    {
        var node = NodeProtocol.NodeName(removed.Address);
        var lost = _checkpointed.Values.Where(c => c.Node == node).ToList();
        foreach (var c in lost) _checkpointed.Remove(c.Name);
        if (lost.Count == 0) return;
        var oldest = _cluster.State.Members.Where(m => m.Status == MemberStatus.Up && !m.Address.Equals(removed.Address))
            .OrderBy(m => m, Member.AgeOrdering).FirstOrDefault();
        if (oldest is null || !oldest.Address.Equals(_cluster.SelfAddress)) return;
        foreach (var c in lost)
        {
            if (_vms.TryGetValue(c.Name, out var existing) && existing.Ended.Length == 0)
            {
                Log.Warning("VM {Name} of the removed node {Node} is not started again: a VM of that name runs here", c.Name, node);
                continue;
            }
            var why = "";
            try
            {
                // The newest complete checkpoint that opens (all of memory read before the VM starts: the
                // checkpoints go on and remove the older ones).
                var latest = (Sequence: 0L, Path: (string?)null);
                Snapshot.VmRestore? restore = null;
                foreach (var candidate in CheckpointProtocol.Complete(c.Directory))
                {
                    try
                    {
                        restore = Snapshot.VmRestore.Open(candidate.Path, eager: true);
                        latest = candidate;
                        break;
                    }
                    catch (Snapshot.SnapshotException e)
                    {
                        why = e.Message;
                        Log.Warning("VM {Name}: checkpoint {Checkpoint} cannot be used: {Why}", c.Name, candidate.Path, e.Message);
                    }
                }
                if (restore is null || latest.Path is null) why = $"no usable checkpoint in {c.Directory}{(why.Length > 0 ? $" ({why})" : "")}";
                else if (!TryConfig(c.Name, c.Settings, out var hocon, out var vm, out var error)) why = error;
                else
                {
                    if (existing is not null) Context.Stop(existing.Console);
                    var hub = Context.ActorOf(ConsoleProtocol.Props(c.Name), $"console-{c.Name}-{Guid.NewGuid():N}");
                    _vms[c.Name] = new Slot(c.Name, restore.Spec.Cpus, (long)restore.Spec.MemoryBytes, hub, c.Settings)
                    {
                        Origin = $"started again from {Path.GetFileName(latest.Path)} after {node} was removed",
                    };
                    Log.Warning("VM {Name} ran on the removed node {Node}: starting it here from {Checkpoint}", c.Name, node, latest.Path);
                    BuildAsync(c.Name, hocon, vm, hub, restore, ActorRefs.Nobody, BuildKind.FailedOver);
                    continue;
                }
            }
            catch (Exception e) when (e is Snapshot.SnapshotException or IOException or UnauthorizedAccessException)
            {
                why = e.Message;
            }
            Log.Error("VM {Name} ran on the removed node {Node} and cannot be started again here: {Why}", c.Name, node, why);
        }
    }

    /// <summary>The configuration of VM <paramref name="name"/> from <paramref name="settings"/> over this node's defaults.</summary>
    private bool TryConfig(string name, NodeProtocol.Setting[] settings, out Akka.Configuration.Config hocon, out VmConfig vm, out string error)
    {
        try
        {
            hocon = ConfigValues.From(settings.Select(s => KeyValuePair.Create(s.Key, s.Value))
                .Append(KeyValuePair.Create("actorvmm.vm.name", name))).WithFallback(_defaults);
            vm = VmConfig.From(hocon);
            error = "";
            return true;
        }
        catch (ConfigException e)
        {
            hocon = _defaults;
            vm = null!;
            error = e.Message;
            return false;
        }
    }

    private void AnswerStopWaiters()
    {
        if (_stopWaiters.Count == 0 || _vms.Values.Any(v => v.Resources is not null)) return;
        foreach (var w in _stopWaiters) w.Tell(AllStopped.Instance);
        _stopWaiters.Clear();
    }
}
