using Akka.Actor;
using ActorVmm.Devices;

namespace ActorVmm.Testing;

// Shared by the test projects that run VMs: link it with
// <Compile Include="../Shared/VmFaults.cs" /> (the project must reference Host).

/// <summary>
/// Fault injection for tests, by the actor's path below its VM ("uart0", "vcpu-1", "vlapic-0",
/// "apic-router", "vmspace"): the same messages `actorvmm ctl fault` sends to a live VM. Link faults
/// (drop, delay, duplicate) are a <see cref="Devices.Tracing.LinkFaultPlan"/> given when the VM is
/// built (VmBuilder.WithLinkFaults).
/// </summary>
public static class VmFaults
{
    private static readonly TimeSpan Resolve = TimeSpan.FromSeconds(10);

    public static Task<IActorRef> ActorAsync(ActorSystem system, IActorRef vm, string path) =>
        system.ActorSelection(vm.Path / path).ResolveOne(Resolve);

    /// <summary>Makes the actor throw; its supervisor (the VM) decides what happens.</summary>
    public static async Task CrashAsync(ActorSystem system, IActorRef vm, string path, string reason) =>
        (await ActorAsync(system, vm, path)).Tell(new FaultProtocol.Crash(reason));

    /// <summary>Stalls an actor already resolved; the task ends with the stall. (Resolving a vcpu
    /// kicks it out of the guest: a test that watches for the stall's kick resolves first.)</summary>
    public static async Task<string> StallAsync(IActorRef actor, TimeSpan duration, string reason)
    {
        var reply = await actor.Ask<FaultProtocol.Injected>(new FaultProtocol.Stall(duration, reason), duration + Resolve);
        return reply.What;
    }

    /// <summary>Stalls an actor already resolved and returns once its thread is inside the stall
    /// (it published <see cref="FaultProtocol.StallStarted"/>, which says when it stopped), not
    /// merely once the message was sent; <c>Ended</c> ends with the stall.</summary>
    public static async Task<(FaultProtocol.StallStarted Started, Task<string> Ended)> StallStartedAsync(
        ActorSystem system, IActorRef actor, TimeSpan duration, string reason)
    {
        var started = new TaskCompletionSource<FaultProtocol.StallStarted>(TaskCreationOptions.RunContinuationsAsynchronously);
        var watcher = system.ActorOf(Props.Create(() => new StallWatcher(actor.Path.ToStringWithoutAddress(), started)));
        system.EventStream.Subscribe(watcher, typeof(FaultProtocol.StallStarted)); // before the stall is sent
        try
        {
            var ended = StallAsync(actor, duration, reason);
            return (await started.Task.WaitAsync(Resolve + duration), ended);
        }
        finally
        {
            system.Stop(watcher);
        }
    }

    private sealed class StallWatcher : ReceiveActor
    {
        public StallWatcher(string actor, TaskCompletionSource<FaultProtocol.StallStarted> started) =>
            Receive<FaultProtocol.StallStarted>(s => { if (s.Actor == actor) started.TrySetResult(s); });

        protected override void PostStop() => Context.System.EventStream.Unsubscribe(Self);
    }

    /// <summary>Arms the failure of the vmspace's next <paramref name="count"/> nested page faults
    /// (on the page of <paramref name="gpa"/> only, when given).</summary>
    public static async Task<string> FailNestedPageFaultsAsync(ActorSystem system, IActorRef vm, int count, ulong? gpa, string reason)
    {
        var vmspace = await ActorAsync(system, vm, "vmspace");
        return await vmspace.Ask<object>(new FaultProtocol.FailNestedPageFaults(count, gpa, reason), Resolve) switch
        {
            FaultProtocol.Injected i => i.What,
            FaultProtocol.NotInjected n => throw new InvalidOperationException(n.Why),
            var other => throw new InvalidOperationException($"the vmspace answered {other.GetType().Name}"),
        };
    }
}
