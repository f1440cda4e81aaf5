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

    private sealed class Slot(string name, int vcpus, long memory, IActorRef console)
    {
        public string Name { get; } = name;
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
        bool VirtioConsole = false);

    private sealed record BuildDone(string Name, Built? Result, string? Error, IActorRef ReplyTo);

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
            .Select(v => new ControlProtocol.VmEntry(v.Name, v.Actor, v.Trace, v.Console, _node, v.Ended)).ToArray();

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
        VmConfig vm;
        Akka.Configuration.Config hocon;
        try
        {
            hocon = ConfigValues.From(start.Settings.Select(s => KeyValuePair.Create(s.Key, s.Value))
                .Append(KeyValuePair.Create("actorvmm.vm.name", name))).WithFallback(_defaults);
            vm = VmConfig.From(hocon);
        }
        catch (ConfigException e)
        {
            Sender.Tell(new NodeProtocol.RunRefused(name, e.Message));
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
        _vms[name] = new Slot(name, vm.Cpus, (long)vm.MemoryBytes, hub);
        var system = Context.System;
        var self = Self;
        var replyTo = Sender;
        Task.Run(() =>
        {
            try { return new BuildDone(name, Build(system, hocon, vm, hub), null, replyTo); }
            catch (Exception e) when (e is ConfigException or BootException or VmBuildException or IOException or UnauthorizedAccessException
                                          or InvalidActorNameException)
            {
                return new BuildDone(name, null, e.Message, replyTo);
            }
            catch (Exception e)
            {
                Log.Error(e, "building VM {Name} failed", name);
                return new BuildDone(name, null, $"{e.GetType().Name}: {e.Message}", replyTo);
            }
        }).PipeTo(self);
    }

    /// <summary>Builds and starts the VM (a pool thread): what `run` does in a process of its own.</summary>
    private static Built Build(ActorSystem system, Akka.Configuration.Config hocon, VmConfig vm, IActorRef hub)
    {
        var boot = BootSource.FromConfig(hocon);
        var console = SerialConsole.ToSink(bytes => hub.Tell(new ConsoleProtocol.Output(bytes)),
            vm.SerialOutput == "stdout" ? null : vm.SerialOutput);
        TraceRecorder? trace = null;
        try
        {
            if (vm.TracePath is not null || vm.PerfettoPath is not null || vm.TraceLive)
                trace = new TraceRecorder(vm.TracePath, filter: Tracing.TraceFilter.Parse(vm.TraceFilter));
            var spec = new VmSpec(vm.Name, vm.MemoryBytes, vm.Cpus, boot, vm.Lapic, vm.Paging, vm.Superpages, vm.SharedMemory, vm.TestDevices) { Cpu = vm.Cpu, Rng = vm.Rng, Disk = vm.Disk, VirtioConsole = vm.VirtioConsole, Net = vm.Net, DeviceNodes = vm.DeviceNodes };
            var builder = new VmBuilder(system, spec).WithStandardDevices(console);
            if (trace is not null) builder.WithTrace(trace);
            var running = builder.Start();
            return new Built(vm.Name, running, console, trace, vm.PerfettoPath, vm.TimeoutSeconds, vm.VirtioConsole);
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
            Context.Stop(slot.Console);
            _vms.Remove(done.Name);
            done.ReplyTo.Tell(new NodeProtocol.RunRefused(done.Name, done.Error ?? "the VM could not be built"));
            return;
        }
        slot.Resources = built;
        slot.Actor = built.Vm.Actor;
        if (built.Trace is not null) slot.Trace = Context.ActorOf(TraceProtocol.Props(done.Name, built.Trace), $"trace-{done.Name}-{Guid.NewGuid():N}");
        slot.Console.Tell(new ConsoleProtocol.Connect(built.Vm.Actor, built.VirtioConsole));
        var self = Self;
        var name = done.Name;
        var ending = built.TimeoutSeconds > 0 ? built.Vm.WaitAsync(TimeSpan.FromSeconds(built.TimeoutSeconds)) : built.Vm.Ended;
        ending.ContinueWith(t => self.Tell(new Ended(name, t.Result)), TaskContinuationOptions.ExecuteSynchronously);
        done.ReplyTo.Tell(new NodeProtocol.VmStarted(done.Name, _node));
        Log.Information("VM {Name} started on {Node}", done.Name, _node);
    }

    private void OnEnded(Ended e)
    {
        if (!_vms.TryGetValue(e.Name, out var slot) || slot.Resources is not { } built) return;
        var detail = $"{HostRunner.Describe(e.Outcome)} (exit code {e.Outcome.ExitCode})";
        slot.Ended = detail;
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
                hub.Tell(new ConsoleProtocol.VmEnded(detail));
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

    private void AnswerStopWaiters()
    {
        if (_stopWaiters.Count == 0 || _vms.Values.Any(v => v.Resources is not null)) return;
        foreach (var w in _stopWaiters) w.Tell(AllStopped.Instance);
        _stopWaiters.Clear();
    }
}
