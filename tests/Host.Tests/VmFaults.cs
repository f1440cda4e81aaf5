using Akka.Actor;
using Akka.TestKit;
using ActorVmm.Testing;

namespace ActorVmm.Host.Tests;

/// <summary><see cref="VmFaults"/> for TestKit test classes (the kit's actor system).</summary>
internal static class TestKitVmFaults
{
    public static Task<IActorRef> ActorAsync(this TestKitBase kit, IActorRef vm, string path) => VmFaults.ActorAsync(kit.Sys, vm, path);

    public static Task CrashAsync(this TestKitBase kit, IActorRef vm, string path, string reason) => VmFaults.CrashAsync(kit.Sys, vm, path, reason);

    public static Task<string> FailNestedPageFaultsAsync(this TestKitBase kit, IActorRef vm, int count, ulong? gpa, string reason) =>
        VmFaults.FailNestedPageFaultsAsync(kit.Sys, vm, count, gpa, reason);
}
